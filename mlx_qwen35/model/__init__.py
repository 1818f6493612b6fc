"""The whole Qwen3.5 checkpoint as one MLX module, and its checkpoint contract.

Parameter names are the Hugging Face ones without the leading ``model.``:
``language_model.*``, ``visual.*`` and ``mtp.*``. :class:`Model` answers what
a Qwen3.5 checkpoint is: how each writer's names and layouts map onto it
(:meth:`Model.sanitize`), which tensors keep float32, which layers quantize
to how many bits, and its cache.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Optional, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map_with_path

from ..config import ModelConfig, TextConfig
from ..errors import Qwen35Error
from .cache import KV_BITS, AttentionCache, QuantizedAttentionCache, RecurrentCache
from .mtp import MTP, MTPCache
from .text import DecoderLayer, TextModel

# Each writer's prefixes → ours, first match wins ("mlx" is mlx-lm and mlx-vlm).
RENAMES = {
    "hf": (
        ("model.language_model.", "language_model."),
        ("model.visual.", "visual."),
        ("model.", "language_model."),  # flat qwen3_5_text checkpoints
        ("lm_head.", "language_model.lm_head."),
    ),
    "mlx": (
        ("language_model.model.", "language_model."),
        ("vision_tower.", "visual."),
    ),
}

# Zero-centred RMSNorms (x̂·(1+w)) whose HF weight gets the +1 folded in.
# linear_attn.norm and the vision LayerNorms are plain and keep their weight.
SHIFTED_NORMS = (
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "q_norm.weight",
    "k_norm.weight",
    "pre_fc_norm_embedding.weight",
    "pre_fc_norm_hidden.weight",
)

# The per-tensor precision policy of a quantized conversion; first match wins.
# "keep" leaves the layer at --dtype; a number is the fewest bits it gets.
# Not listed because they are never quantizable: conv1d, A_log, dt_bias and
# every norm stay at --dtype (A_log and the text norms in float32).
# Why each rule, with the measurement behind it: README "Quantization policy".
QUANT_POLICY: tuple[tuple[str, Union[str, int]], ...] = (
    # [Hv, hidden]: negligible size, and they set every step's decay and beta
    (r"\.in_proj_[ab]$", "keep"),
    # The vision tower stays at --dtype unless --quantize-vision
    (r"^visual\.", "vision"),
    # GDN output projection: sensitive on these hybrids, 4 % of the weights
    (r"\.linear_attn\.out_proj$", 8),
    # The 6 full-attention layers' projections: sensitive, 5 % of the weights
    (r"\.self_attn\.[qkvo]_proj$", 8),
    # Tied embedding = output head: a quarter of the bytes read per token at 4 bits
    (r"(^|\.)(embed_tokens|lm_head)$", 6),
    (r"", "default"),
)


class Model(nn.Module):
    def __init__(self, config: ModelConfig, *, vision: bool = True, mtp: bool = False):
        super().__init__()
        self.config = config
        self.language_model = TextModel(config.text)
        if vision and config.vision is not None:
            from .vision import VisionModel

            self.visual = VisionModel(config.vision)
        if mtp and config.text.mtp_num_hidden_layers > 0:
            self.mtp = MTP(config.text)

    @property
    def layers(self) -> list[DecoderLayer]:
        return self.language_model.layers

    # -----------------------------------------------------------------------------------------
    # The checkpoint contract

    @staticmethod
    def sanitize(name: str, w: mx.array, fmt: str) -> tuple[str, mx.array]:
        """One tensor of a ``fmt`` checkpoint ('hf', 'mlx' or 'ours') under our name and layout.

        From Hugging Face: conv1d [C,1,K] → [C,K,1]; the Conv3d patch embed
        [O,C,T,P,P] → a Linear [O, C·T·P·P]; zero-centred norms get their +1,
        added in float32 and kept there. From mlx-vlm: its channels-last patch
        embed [O,T,P,P,C] → [O, C·T·P·P].
        """
        for old, new in RENAMES.get(fmt, ()):
            if name.startswith(old):
                name = new + name[len(old) :]
                break
        if fmt == "hf":
            if name.endswith("conv1d.weight") and w.ndim == 3:
                w = w.moveaxis(2, 1)
            elif name == "visual.patch_embed.proj.weight" and w.ndim == 5:
                w = w.reshape(w.shape[0], -1)
            elif name.endswith(SHIFTED_NORMS) or name in ("language_model.norm.weight", "mtp.norm.weight"):
                w = w.astype(mx.float32) + 1.0
        elif fmt == "mlx" and name == "visual.patch_embed.proj.weight" and w.ndim == 5:
            w = w.transpose(0, 4, 1, 2, 3).reshape(w.shape[0], -1)
        return name, w

    def held(self, tensors: dict[str, mx.array]) -> dict[str, mx.array]:
        """The checkpoint's tensors less what this model leaves out: MTP or vision when not built, a tied head.

        Any other tensor stays, so that loading names it as unexpected.
        """
        own = {k for k, _ in tree_flatten(self.parameters())}
        prefixes = []
        if not self.has_mtp:
            prefixes.append("mtp.")
        if not hasattr(self, "visual"):
            prefixes.append("visual.")
        if self.config.text.tie_word_embeddings:
            prefixes.append("language_model.lm_head.")
        return {k: v for k, v in tensors.items() if k in own or not k.startswith(tuple(prefixes))}

    @staticmethod
    def keeps_float32(name: str) -> bool:
        """Small tensors whose precision matters more than their size: A_log and text RMSNorm weights."""
        return name.endswith("A_log") or (not name.startswith("visual.") and name.endswith("norm.weight"))

    def cast(self, dtype: mx.Dtype, keep: Optional[Callable[[str, mx.array], bool]] = None) -> None:
        """Cast floating parameters to ``dtype``; those of :meth:`keeps_float32` to float32; those ``keep`` names, not at all."""

        def f(name, w):
            if not mx.issubdtype(w.dtype, mx.floating) or (keep is not None and keep(name, w)):
                return w
            return w.astype(mx.float32 if self.keeps_float32(name) else dtype)

        self.update(tree_map_with_path(f, self.parameters()))

    @staticmethod
    def quant_predicate(path: str, module: nn.Module, spec) -> Union[bool, dict]:
        """The :data:`QUANT_POLICY` decision for one layer under a ``QuantSpec``: False, or its to_quantized() settings."""
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            return False
        for pattern, rule in QUANT_POLICY:
            if re.search(pattern, path):
                break
        if rule == "keep" or (rule == "vision" and not spec.vision):
            return False
        settings = spec.settings(rule if isinstance(rule, int) else None)
        if module.weight.shape[-1] % settings["group_size"]:
            return False  # cannot be grouped; stays at --dtype
        return settings

    @property
    def has_mtp(self) -> bool:
        """Whether the multi-token-prediction head is loaded (speculative decoding can draft with it)."""
        return hasattr(self, "mtp")

    def make_cache(self, kv_bits: Optional[int] = None, *, mtp: bool = False) -> list[Any]:
        """One cache per layer: conv + recurrent state for Gated DeltaNet, KV for attention.

        ``kv_bits`` (4 or 8) quantizes the attention KV (the recurrent state
        stays float32). ``mtp`` (with the head loaded) appends the head's
        :class:`MTPCache`, which the engine then keeps in step, so any turn can draft.
        """
        if kv_bits is not None and kv_bits not in KV_BITS:
            raise Qwen35Error(f"kv_bits: {kv_bits} is not one of {KV_BITS}")
        attention = lambda: (
            AttentionCache() if kv_bits is None else QuantizedAttentionCache(group_size=self.kv_group_size, bits=kv_bits)
        )
        cache = [RecurrentCache() if layer.is_linear else attention() for layer in self.layers]
        return cache + [MTPCache()] if mtp and self.has_mtp else cache

    @property
    def kv_group_size(self) -> int:
        """Elements per scale and bias of a quantized KV cache."""
        return 64 if self.config.text.head_dim % 64 == 0 else 32

    def __call__(self, inputs: Optional[mx.array], cache: Optional[list[Any]] = None, **kw) -> mx.array:
        """Logits [B, T, vocab] for token ids [B, T] (or ``input_embeddings`` [B, T, hidden]).

        The keywords are ``TextModel.hidden_states``'s: ``positions`` [3, B, T]
        are explicit mRoPE positions (prompts with images); without them token
        i sits at ``cache offset + rope_delta + i`` on every axis, which is how
        decoding continues after an image.
        """
        lm = self.language_model
        return lm.logits(lm.hidden_states(inputs, cache, **kw))

    def encode_vision(self, pixel_values, grid_thw) -> mx.array:
        """Vision features [Σ t·h·w / 4, hidden] for processor patches and their grids."""
        if not hasattr(self, "visual"):
            raise Qwen35Error(
                "images: this model has no vision tower (a text-only checkpoint, or loaded with vision=False)"
            )
        return self.visual(mx.array(pixel_values), grid_thw)

    def embed_multimodal(
        self,
        input_ids,
        pixel_values=None,
        image_grid_thw=None,
        pixel_values_videos=None,
        video_grid_thw=None,
    ) -> mx.array:
        """Input embeddings [B, T, hidden] with vision features in the pad tokens' places.

        ``input_ids`` [B, T] must already hold one ``<|image_pad|>`` /
        ``<|video_pad|>`` per merged token (``processor.expand_vision_tokens``);
        features fill them in order, images and videos separately.
        """
        encode = lambda pixels, grid: None if pixels is None else self.encode_vision(pixels, grid)
        return self.embed_with_features(
            input_ids, encode(pixel_values, image_grid_thw), encode(pixel_values_videos, video_grid_thw)
        )

    def embed_with_features(self, input_ids, image_features=None, video_features=None) -> mx.array:
        """As :meth:`embed_multimodal`, from vision features already encoded."""
        ids = np.asarray(input_ids)
        ids = ids[None] if ids.ndim == 1 else ids
        h = self.language_model.embed(mx.array(ids))
        B, T, D = h.shape
        flat = h.reshape(B * T, D)
        for kind, token, features in (
            ("image", self.config.image_token_id, image_features),
            ("video", self.config.video_token_id, video_features),
        ):
            where = np.flatnonzero(ids.reshape(-1) == token)
            if features is None:
                if where.size:
                    raise Qwen35Error(f"input_ids: {where.size} <|{kind}_pad|> tokens but no {kind} was given")
                continue
            if features.shape[0] != where.size:
                raise Qwen35Error(
                    f"input_ids: {where.size} <|{kind}_pad|> tokens, but the {kind}s give "
                    f"{features.shape[0]} features (one pad per merged token is expected)"
                )
            flat[mx.array(where)] = features.astype(flat.dtype)
        return flat.reshape(B, T, D)
