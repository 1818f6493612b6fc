"""The whole Qwen3.5 checkpoint as one MLX module.

Parameter names are the Hugging Face ones without the leading ``model.``:
``language_model.*``, ``visual.*`` and ``mtp.*``.
"""

from __future__ import annotations

from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..config import ModelConfig, TextConfig
from ..errors import Qwen35Error
from .cache import make_cache
from .text import DecoderLayer, RMSNorm, TextModel


class MTP(nn.Module):
    """Holds the multi-token-prediction head's weights.

    Nothing runs it yet; it exists so conversion validates, casts and
    quantizes these tensors like the rest and keeps them for speculative
    decoding, with no re-conversion later.
    """

    def __init__(self, cfg: TextConfig):
        super().__init__()
        h = cfg.hidden_size
        self.fc = nn.Linear(2 * h, h, bias=False)
        self.pre_fc_norm_embedding = RMSNorm(h, cfg.rms_norm_eps)
        self.pre_fc_norm_hidden = RMSNorm(h, cfg.rms_norm_eps)
        self.layers = [DecoderLayer(cfg, "full_attention") for _ in range(cfg.mtp_num_hidden_layers)]
        self.norm = RMSNorm(h, cfg.rms_norm_eps)


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

    def make_cache(self, kv_bits: Optional[int] = None) -> list[Any]:
        """One cache per layer: conv + recurrent state for Gated DeltaNet, KV for attention.

        ``kv_bits`` (4 or 8) quantizes the attention KV.
        """
        return make_cache(self.layers, kv_bits)

    def __call__(
        self,
        inputs: Optional[mx.array],
        cache: Optional[list[Any]] = None,
        input_embeddings: Optional[mx.array] = None,
        positions: Optional[mx.array] = None,
        rope_delta: int = 0,
    ) -> mx.array:
        """Logits [B, T, vocab] for token ids [B, T] (or embeddings [B, T, hidden]).

        ``positions`` [3, B, T] are explicit mRoPE positions (prompts with images);
        without them token i sits at ``cache offset + rope_delta + i`` on every
        axis, which is how decoding continues after an image.
        """
        lm = self.language_model
        return lm.logits(lm.hidden_states(inputs, cache, input_embeddings, positions, rope_delta))

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
