"""The Qwen3.5 hybrid text decoder.

Layers alternate Gated DeltaNet (linear attention with a recurrent state) and
gated full attention, as ``layer_types`` lists them; each is followed by a
SwiGLU MLP. Norm weights are stored already shifted (``1 + w``, in float32),
so plain RMSNorms apply them. The graph never asks where it runs: :mod:`..ops`
picks each kernel per device, and the loader swaps in CPU-fast projections.
"""

from __future__ import annotations

from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask, create_ssm_mask

from .. import ops
from ..config import TextConfig
from .rope import MRoPE


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def __call__(self, x):
        return self.down_proj(ops.swiglu(self.gate_proj(x), self.up_proj(x)).astype(x.dtype))


class RMSNorm(nn.Module):
    """RMSNorm whose float32 weight never demotes the activations' dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dim,))
        self.eps = eps

    def __call__(self, x):
        return mx.fast.rms_norm(x, self.weight, self.eps).astype(x.dtype)


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
        if cache is not None and cache.record:
            cache.conv_inputs = xs  # every step's tail, for RecurrentCache.keep
        if cache is not None:
            # A copy: a view of the tail would keep the whole chunk's input alive
            # (50 MB per layer for a 2048-token chunk at the 2B shape).
            cache[0] = mx.contiguous(xs[:, -(K - 1) :])
        out = ops.causal_conv(xs, self.conv1d.weight.astype(x.dtype))
        return ops.sigmoid_mul(out, out).astype(x.dtype)

    def __call__(self, x: mx.array, cache=None, mask: Optional[mx.array] = None, positions=None) -> mx.array:
        B, T, _ = x.shape
        qkv = self.in_proj_qkv(x)
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

        beta = mx.sigmoid(self.in_proj_b(x).astype(mx.float32))
        a = self.in_proj_a(x).astype(mx.float32)
        g = mx.exp(-mx.exp(self.A_log.astype(mx.float32)) * nn.softplus(a + self.dt_bias.astype(mx.float32)))

        state = cache[1] if cache is not None else None
        if cache is not None and cache.record:
            y, cache.step_states = self._each_step(q, k, v, g, beta, state, mask)
            state = cache.step_states[-1]
        else:
            y, state = ops.gated_delta_update(q, k, v, g, beta, state, mask)
        if cache is not None:
            cache[1] = state

        z = self.in_proj_z(x).reshape(B, T, self.n_v, self.d_v)
        y = mx.fast.rms_norm(y.astype(mx.float32), None, self.norm.eps).astype(x.dtype)
        y = ops.swiglu(z, y * self.norm.weight)
        out = self.out_proj(y.astype(x.dtype).reshape(B, T, -1))
        if cache is None:
            return out
        # Make the next layer wait for this layer's cache: evaluated only at the
        # end of a prefill chunk, the states would keep every layer's inputs
        # alive until then, so peak memory would hold all layers' activations.
        return mx.depends(out, [cache[0], cache[1]])


    @staticmethod
    def _each_step(q, k, v, g, beta, state, mask) -> tuple[mx.array, list[mx.array]]:
        """The recurrence one step at a time: its output and the state after every step (a few drafts' worth)."""
        ys, states = [], []
        for t in range(q.shape[1]):
            at = lambda a: None if a is None else a[:, t : t + 1]
            y, state = ops.gated_delta_update(at(q), at(k), at(v), at(g), at(beta), state, at(mask))
            ys.append(y)
            states.append(state)
        return mx.concatenate(ys, axis=1), states


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
        qg = self.q_proj(x).reshape(B, T, self.n_heads, 2 * self.head_dim)
        q, gate = mx.split(qg, 2, axis=-1)
        q = self.q_norm(q).transpose(0, 2, 1, 3)
        k = self.k_norm(self.k_proj(x).reshape(B, T, self.n_kv, -1)).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, T, self.n_kv, -1).transpose(0, 2, 1, 3)

        # After an image, text positions run rope_delta ahead of the cache index.
        offset = (cache.offset if cache is not None else 0) + rope_delta
        q = self.rope(q, offset, positions)
        k = self.rope(k, offset, positions)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = ops.attention(q, k, v, cache, self.head_dim**-0.5, mask)
        out = out.transpose(0, 2, 1, 3).reshape(B, T, -1)
        return self.o_proj(ops.sigmoid_mul(gate.reshape(B, T, -1), out).astype(x.dtype))


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
        # Masks come from the caches: a left-padded batch hides each row's padding.
        attn_cache = next((c for c, l in zip(cache, self.layers) if not l.is_linear), None)
        linear_cache = next((c for c, l in zip(cache, self.layers) if l.is_linear), None)
        attn_mask = create_attention_mask(h, attn_cache)
        linear_mask = create_ssm_mask(h, linear_cache)
        for layer, c in zip(self.layers, cache):
            h = layer(h, c, linear_mask if layer.is_linear else attn_mask, positions, rope_delta)
        return self.norm(h)

    def logits(self, h: mx.array) -> mx.array:
        head = self.embed_tokens.as_linear if self.cfg.tie_word_embeddings else self.lm_head
        return head(h)
