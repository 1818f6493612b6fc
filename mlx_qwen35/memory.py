"""What a model costs in memory: its weights, the KV cache per token and the recurrent state."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from .loading import run_dtype
from .model.cache import KV_BITS


@dataclass(frozen=True)
class Footprint:
    """Bytes the model takes at run time; KV per token for full-precision and quantized caches."""

    weights: dict[str, int]  # "text", "vision" (loaded only when an image arrives)
    kv_per_token: dict[Optional[int], float]  # kv_bits (None = unquantized) → bytes per token
    state: int  # conv + recurrent state of every Gated DeltaNet layer, per conversation
    compute_dtype: mx.Dtype
    attention_layers: int
    linear_layers: int
    max_context: int

    def longest_context(self, available: int, kv_bits: Optional[int] = None) -> int:
        """Tokens whose KV fits in ``available`` bytes besides the text weights and the state."""
        free = available - self.weights["text"] - self.state
        return max(0, min(self.max_context, int(free // self.kv_per_token[kv_bits])))


def footprint(model) -> Footprint:
    """The :class:`Footprint` of a (lazy) model, from its config and its parameters' shapes and dtypes."""
    cfg = model.config.text
    lm = model.language_model
    compute = lm.dtype or run_dtype(model)  # the activations' dtype, hence the KV's
    size = compute.size
    attn = [layer for layer in lm.layers if not layer.is_linear]
    linear = len(lm.layers) - len(attn)
    elements = 2 * len(attn) * cfg.num_key_value_heads * cfg.head_dim  # keys and values
    kv: dict[Optional[int], float] = {None: elements * size}
    for bits in KV_BITS:
        kv[bits] = elements * (bits / 8 + 2 * size / model.kv_group_size)  # packed values, then a scale and a bias per group
    # conv state in the compute dtype; the recurrent state is always float32
    per_layer = (cfg.linear_conv_kernel_dim - 1) * cfg.conv_dim * size
    per_layer += cfg.linear_num_value_heads * cfg.linear_value_head_dim * cfg.linear_key_head_dim * 4
    weights = {"text": sum(w.nbytes for _, w in tree_flatten(lm.parameters()))}
    if getattr(model, "visual", None) is not None:
        weights["vision"] = sum(w.nbytes for _, w in tree_flatten(model.visual.parameters()))
    return Footprint(weights, kv, linear * per_layer, compute, len(attn), linear, cfg.max_position_embeddings)


def available_memory() -> tuple[int, str]:
    """Bytes the model may use, and where that figure comes from."""
    if mx.metal.is_available():
        return int(mx.device_info()["max_recommended_working_set_size"]), "Metal's recommended working set"
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024, "MemAvailable"
        except OSError:
            pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "physical memory"


__all__ = ["Footprint", "available_memory", "footprint"]
