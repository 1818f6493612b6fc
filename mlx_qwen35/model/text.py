"""The Qwen3.5 hybrid text decoder.

Layers alternate Gated DeltaNet (linear attention with a recurrent state) and
gated full attention, as ``layer_types`` lists them; each is followed by a
SwiGLU MLP. Norm weights are stored already shifted (``1 + w``, in float32),
so plain RMSNorms apply them.
"""

from __future__ import annotations

from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask, scaled_dot_product_attention

from ..config import TextConfig
from ..ops.recurrence import gated_delta_update
from ..ops.cpu import cpu_attention, cpu_paths, per_shape_compile, project, sigmoid_mul, swiglu
from .rope import MRoPE


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def __call__(self, x):
        return project(self.down_proj, swiglu(project(self.gate_proj, x), project(self.up_proj, x)).astype(x.dtype))


class RMSNorm(nn.Module):
    """RMSNorm whose float32 weight never demotes the activations' dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dim,))
        self.eps = eps

    def __call__(self, x):
        return mx.fast.rms_norm(x, self.weight, self.eps).astype(x.dtype)


@per_shape_compile
def _conv_taps(xs: mx.array, w: mx.array) -> mx.array:
    """Causal depthwise conv of xs [B, T + K - 1, C] with taps w [K, C].

    The CPU path (elsewhere MLX's grouped conv runs, as in mlx-lm). A K-tap
    sum of shifted slices: exact, and cheaper than a grouped conv there;
    compiled, one pass instead of 2K - 1 (taps as rows: a column of [C, K]
    made the CPU kernel strided: 40 ms against 17 at T = 2048).
    """
    K = w.shape[0]
    T = xs.shape[1] - K + 1
    out = xs[:, 0:T] * w[0]
    for j in range(1, K):
        out = out + xs[:, j : j + T] * w[j]
    return out


class GatedDeltaNet(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.n_k = cfg.linear_num_key_heads
        self.n_v = cfg.linear_num_value_heads
        self.d_k = cfg.linear_key_head_dim
        self.d_v = cfg.linear_value_head_dim
        self.key_dim = cfg.linear_key_dim
        self.kernel = cfg.linear_conv_kernel_dim
        conv_dim = cfg.conv_dim
        h = cfg.hidden_size

        self.in_proj_qkv = nn.Linear(h, conv_dim, bias=False)
        self.in_proj_z = nn.Linear(h, cfg.linear_value_dim, bias=False)
        self.in_proj_b = nn.Linear(h, self.n_v, bias=False)
        self.in_proj_a = nn.Linear(h, self.n_v, bias=False)
        # Depthwise causal conv, MLX layout [C, K, 1]
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, self.kernel, groups=conv_dim, bias=False)
        self.dt_bias = mx.ones((self.n_v,))
        self.A_log = mx.zeros((self.n_v,))
        self.norm = RMSNorm(self.d_v, cfg.rms_norm_eps)
        self.out_proj = nn.Linear(cfg.linear_value_dim, h, bias=False)

    def _conv(self, x: mx.array, cache) -> mx.array:
        """SiLU(causal depthwise conv) over T, continuing from the cached tail."""
        B, _, C = x.shape
        K = self.kernel
        state = cache[0] if cache is not None else None
        if state is None:
            state = mx.zeros((B, K - 1, C), dtype=x.dtype)
        xs = mx.concatenate([state.astype(x.dtype), x], axis=1)
        if cache is not None:
            # A copy: a view of the tail would keep the whole chunk's input alive
            # (50 MB per layer for a 2048-token chunk at the 2B shape).
            cache[0] = mx.contiguous(xs[:, -(K - 1) :])
        w = self.conv1d.weight.astype(x.dtype)
        if cpu_paths():
            out = _conv_taps(xs, mx.contiguous(w[:, :, 0].T))
        else:
            out = mx.conv1d(xs, w, groups=C)
        return sigmoid_mul(out, out).astype(x.dtype)

    def __call__(self, x: mx.array, cache=None, mask: Optional[mx.array] = None, positions=None) -> mx.array:
        B, T, _ = x.shape
        qkv = project(self.in_proj_qkv, x)
        if mask is not None:
            qkv = mx.where(mask[..., None], qkv, 0)
        conv = self._conv(qkv, cache)
        q, k, v = mx.split(conv, [self.key_dim, 2 * self.key_dim], axis=-1)
        q = q.reshape(B, T, self.n_k, self.d_k)
        k = k.reshape(B, T, self.n_k, self.d_k)
        v = v.reshape(B, T, self.n_v, self.d_v)
        # l2norm(x) = rms_norm(x, eps/D) / sqrt(D); q also takes the D^-1/2 readout scale
        eps = 1e-6 / self.d_k
        q = mx.fast.rms_norm(q.astype(mx.float32), None, eps) * (1.0 / self.d_k)
        k = mx.fast.rms_norm(k.astype(mx.float32), None, eps) * (self.d_k**-0.5)

        beta = mx.sigmoid(project(self.in_proj_b, x).astype(mx.float32))
        a = project(self.in_proj_a, x).astype(mx.float32)
        g = mx.exp(-mx.exp(self.A_log.astype(mx.float32)) * nn.softplus(a + self.dt_bias.astype(mx.float32)))

        state = cache[1] if cache is not None else None
        y, state = gated_delta_update(q, k, v, g, beta, state, mask)
        if cache is not None:
            cache[1] = state

        z = project(self.in_proj_z, x).reshape(B, T, self.n_v, self.d_v)
        y = mx.fast.rms_norm(y.astype(mx.float32), None, self.norm.eps).astype(x.dtype)
        y = swiglu(z, y * self.norm.weight)
        out = project(self.out_proj, y.astype(x.dtype).reshape(B, T, -1))
        if cache is None:
            return out
        # Make the next layer wait for this layer's cache: evaluated only at the
        # end of a prefill chunk, the states would keep every layer's inputs
        # alive until then, so peak memory would hold all layers' activations.
        return mx.depends(out, [cache[0], cache[1]])


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = hd = cfg.head_dim
        h = cfg.hidden_size
        self.q_proj = nn.Linear(h, self.n_heads * hd * 2, bias=False)  # query | gate per head
        self.k_proj = nn.Linear(h, self.n_kv * hd, bias=False)
        self.v_proj = nn.Linear(h, self.n_kv * hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * hd, h, bias=False)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.rope = MRoPE(cfg)

    def __call__(self, x: mx.array, cache=None, mask=None, positions=None, rope_delta: int = 0) -> mx.array:
        B, T, _ = x.shape
        qg = project(self.q_proj, x).reshape(B, T, self.n_heads, 2 * self.head_dim)
        q, gate = mx.split(qg, 2, axis=-1)
        q = self.q_norm(q).transpose(0, 2, 1, 3)
        k = self.k_norm(project(self.k_proj, x).reshape(B, T, self.n_kv, -1)).transpose(0, 2, 1, 3)
        v = project(self.v_proj, x).reshape(B, T, self.n_kv, -1).transpose(0, 2, 1, 3)

        # After an image, text positions run rope_delta ahead of the cache index.
        offset = (cache.offset if cache is not None else 0) + rope_delta
        q = self.rope(q, offset, positions)
        k = self.rope(k, offset, positions)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        if cpu_paths() and isinstance(k, mx.array) and (mask is None or isinstance(mask, str)):
            out = cpu_attention(q, k, v, self.head_dim**-0.5, causal=mask is not None)
        else:
            out = scaled_dot_product_attention(q, k, v, cache=cache, scale=self.head_dim**-0.5, mask=mask)
        out = out.transpose(0, 2, 1, 3).reshape(B, T, -1)
        return project(self.o_proj, sigmoid_mul(gate.reshape(B, T, -1), out).astype(x.dtype))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_type: str):
        super().__init__()
        self.is_linear = layer_type == "linear_attention"
        if self.is_linear:
            self.linear_attn = GatedDeltaNet(cfg)
        else:
            self.self_attn = Attention(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)

    def __call__(self, x, cache=None, mask=None, positions=None, rope_delta: int = 0):
        n = self.input_layernorm(x)
        if self.is_linear:
            h = x + self.linear_attn(n, cache, mask)
        else:
            h = x + self.self_attn(n, cache, mask, positions, rope_delta)
        return h + self.mlp(self.post_attention_layernorm(h))


class TextModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [DecoderLayer(cfg, t) for t in cfg.layer_types]
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.dtype: Optional[mx.Dtype] = None  # the activations' dtype, set by the loader

    def embed(self, ids: mx.array) -> mx.array:
        # Float-format (mxfp4, nvfp4, mxfp8) tables have no float scales and dequantize to bf16.
        h = self.embed_tokens(ids)
        return h if self.dtype is None else h.astype(self.dtype)

    def hidden_states(
        self,
        inputs: Optional[mx.array],
        cache: Optional[list[Any]] = None,
        input_embeddings: Optional[mx.array] = None,
        positions: Optional[mx.array] = None,
        rope_delta: int = 0,
    ) -> mx.array:
        h = input_embeddings if input_embeddings is not None else self.embed(inputs)
        if cache is None:
            cache = [None] * len(self.layers)
        attn_cache = next((c for c, l in zip(cache, self.layers) if not l.is_linear), None)
        attn_mask = create_attention_mask(h, attn_cache)
        for layer, c in zip(self.layers, cache):
            h = layer(h, c, None if layer.is_linear else attn_mask, positions, rope_delta)
        return self.norm(h)

    def logits(self, h: mx.array) -> mx.array:
        return project(self.embed_tokens if self.cfg.tie_word_embeddings else self.lm_head, h)
