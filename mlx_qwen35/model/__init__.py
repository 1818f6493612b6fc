"""The whole Qwen3.5 checkpoint as one MLX module.

Parameter names are the Hugging Face ones without the leading ``model.``:
``language_model.*``, ``visual.*`` and ``mtp.*``.
"""

from __future__ import annotations

from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import ArraysCache, KVCache

from ..config import ModelConfig, TextConfig
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

    def make_cache(self) -> list[Any]:
        """One cache per layer: conv + recurrent state for Gated DeltaNet, KV for attention."""
        return [ArraysCache(size=2) if l.is_linear else KVCache() for l in self.layers]

    def __call__(
        self,
        inputs: Optional[mx.array],
        cache: Optional[list[Any]] = None,
        input_embeddings: Optional[mx.array] = None,
        positions: Optional[mx.array] = None,
    ) -> mx.array:
        """Logits [B, T, vocab] for token ids [B, T] (or embeddings [B, T, hidden]).

        ``positions`` [3, B, T] are explicit mRoPE positions (prompts with images).
        """
        lm = self.language_model
        return lm.logits(lm.hidden_states(inputs, cache, input_embeddings, positions))
