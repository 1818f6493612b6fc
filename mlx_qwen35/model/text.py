"""The Qwen3.5 hybrid text decoder.

Layers alternate Gated DeltaNet (linear attention with a recurrent state) and
gated full attention, as ``layer_types`` lists them; each is followed by a
SwiGLU MLP. Norm weights are stored already shifted (``1 + w``, in float32),
so plain RMSNorms apply them.
"""

from __future__ import annotations

import math
from functools import lru_cache, partial
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask, scaled_dot_product_attention

from ..config import TextConfig
from ..gated_delta import gated_delta_update
from .rope import MRoPE


def _on_cpu() -> bool:
    return mx.default_device() == mx.cpu


# --------------------------------------------------------------------------- projections
#
# On MLX's CPU backend only float32 matmuls reach BLAS. Half-precision ones
# run a plain loop, and quantized_matmul with half-precision activations both
# crawls and accumulates in bfloat16 (3.7 % typical relative error against
# the exact product, vs 6e-7 with float32 activations). On the CPU,
# :func:`project` therefore multiplies in float32 through BLAS, casting or
# dequantizing the weight a block of rows at a time (6144 x 2048 weight,
# 2-core x86 with OpenBLAS):
#
#   bfloat16, 128 rows:   672 ms native, 53 ms cast to float32
#   bfloat16, 1 row:      10.7 ms native, 32 ms cast (so below HALF_BLAS_ROWS: native)
#   4-bit, 1 row:         99 ms quantized_matmul, 33 ms dequantized in blocks
#   4-bit, 16 rows:       1780 ms quantized_matmul, 95 ms dequantized in blocks
#
# Blocks of BLOCK_ELEMS weights (4 MB in float32) stay in the range that
# malloc reuses; whole-matrix temporaries are mapped afresh each time, and
# their page faults cost more than the multiply at one row. Elsewhere (Metal)
# the layers run natively.
BLOCK_ELEMS = 1 << 20
HALF_BLAS_ROWS = 8


@lru_cache(maxsize=None)
def _dequantizer(bits: int, group_size: int):
    """(dtype to view the packed weight as, compiled affine dequantization of its rows to float32).

    MLX packs values as a little-endian bit stream. A unit of ``width``
    elements holds ``vals`` whole values: one uint32 word when the bit width
    divides 32 (4-bit: 8 values), else a few bytes (6-bit: 3 bytes, 4
    values). Scale and bias apply in float32, so the weights are exact, not
    rounded to the scales' dtype as ``mx.dequantize`` leaves them.
    """
    if 32 % bits == 0:
        view, elem_bits, width, vals = mx.uint32, 32, 1, 32 // bits
    else:
        g = math.gcd(bits, 8)
        view, elem_bits, width, vals = mx.uint8, 8, bits // g, 8 // g
    utype = mx.uint64 if width * elem_bits > 32 else mx.uint32
    shifts = (mx.arange(vals) * bits).astype(utype)
    mask = (1 << bits) - 1

    def dequantize(packed, scales, biases):
        rows = packed.shape[0]
        packed = packed.reshape(rows, -1, width)
        units = packed[..., 0].astype(utype)
        for i in range(1, width):
            units = units | (packed[..., i].astype(utype) << (elem_bits * i))
        q = (units.reshape(rows, -1, group_size // vals, 1) >> shifts) & mask
        w = q.astype(mx.float32) * scales[..., None, None].astype(mx.float32)
        return (w + biases[..., None, None].astype(mx.float32)).reshape(rows, -1)

    return view, mx.compile(dequantize)


def project(layer: nn.Module, x: mx.array) -> mx.array:
    """``layer(x)`` for a (quantized) Linear, or a (quantized) Embedding used as the output head."""
    native = layer.as_linear if hasattr(layer, "as_linear") else layer
    if not _on_cpu():
        return native(x)
    w = layer.weight
    if "scales" in layer:
        if layer.mode != "affine":
            return native(x)
        view, deq = _dequantizer(layer.bits, layer.group_size)
        packed = mx.view(w, view)
        block = lambda i, j: deq(packed[i:j], layer.scales[i:j], layer.biases[i:j])
        dtype = x.dtype
    elif w.dtype in (mx.bfloat16, mx.float16) and x.size // x.shape[-1] >= HALF_BLAS_ROWS:
        block = lambda i, j: w[i:j].astype(mx.float32)
        dtype = mx.result_type(x, w)
    else:
        return native(x)
    x32 = x.astype(mx.float32)
    n = layer.weight.shape[0]
    step = max(1, BLOCK_ELEMS // (x.shape[-1]))
    outs = []
    for i in range(0, n, step):
        wb = block(i, min(i + step, n))
        if outs:  # after the previous block's product, or MLX would expand every block at once
            wb = mx.depends(wb, outs[-1])
        outs.append(x32 @ wb.T)
    y = mx.concatenate(outs, axis=-1)
    if "bias" in layer:
        y = y + layer.bias
    return y.astype(dtype)


# --------------------------------------------------------------------------- activations
#
# MLX's CPU exp is a scalar loop at ~27 ns an element, 60 times a multiply,
# and every SiLU, sigmoid and softmax pays it. Here exp(a), a <= 0, is
# 2^n exp(r): n = round(a / ln 2), r = a - n ln 2 with ln 2 split in two
# (Cody-Waite) so r is exact, exp(r) by Cephes' minimax polynomial on
# |r| <= ln 2 / 2, and 2^n built in the float's exponent bits. Relative error
# 2e-7 (a couple of ulp), where MLX's own exp and sigmoid reach 3.8e-6. The
# bit trick (a view) cannot fuse, so it is two compiled passes: the exponent,
# then the polynomial and its use. SiLU(g) * u at [2048, 6144], 2-core x86:
# 369 ms with nn.silu, 262 ms here.
_LOG2E = 1.4426950408889634
_LN2_HI, _LN2_LO = 0.693359375, -2.12194440e-4
_EXP_MIN = -87.33  # about ln 2^-126: exp of anything smaller is not a normal float32
_EXP_POLY = (5.0000001201e-1, 1.6666665459e-1, 4.1665795894e-2, 8.3334519073e-3, 1.3981999507e-3, 1.9875691500e-4)


@partial(mx.compile, shapeless=True)
def _exponent(a):
    """n = round(a / ln 2) for a <= 0 (clamped to normal floats), and the bits of 2^n."""
    n = mx.floor(mx.maximum(a, _EXP_MIN) * _LOG2E + 0.5)
    return n, (n.astype(mx.int32) + 127) << 23


def _exp_nonpositive(a, n, scale):
    """exp(a) for a <= 0, given :func:`_exponent`'s n and 2^n; 0 below the normal floats."""
    r = (mx.maximum(a, _EXP_MIN) - n * _LN2_HI) - n * _LN2_LO
    r2 = r * r
    c = _EXP_POLY
    p = (c[0] + c[1] * r) + r2 * (c[2] + c[3] * r) + r2 * r2 * (c[4] + c[5] * r)
    return mx.where(a >= _EXP_MIN, ((1.0 + r) + r2 * p) * scale, 0.0)


def _sigmoid_parts(x, n, scale):
    e = _exp_nonpositive(-mx.abs(x), n, scale)  # exp(-|x|): never overflows
    return mx.where(x >= 0, 1.0, e) / (1.0 + e)


@partial(mx.compile, shapeless=True)
def _gated(x, u, n, scale):
    return u * _sigmoid_parts(x, n, scale)


@partial(mx.compile, shapeless=True)
def _swiglu(x, u, n, scale):
    return x * u * _sigmoid_parts(x, n, scale)


def sigmoid_mul(x: mx.array, u: mx.array) -> mx.array:
    """u * sigmoid(x), in float32 (``silu(x)`` is ``sigmoid_mul(x, x)``); MLX's own off the CPU."""
    x = x.astype(mx.float32)
    if not _on_cpu():
        return u * mx.sigmoid(x)
    n, bits = _exponent(-mx.abs(x))
    return _gated(x, u.astype(mx.float32), n, mx.view(bits, mx.float32))


def swiglu(x: mx.array, u: mx.array) -> mx.array:
    """silu(x) * u, in float32; MLX's own off the CPU."""
    x = x.astype(mx.float32)
    if not _on_cpu():
        return nn.silu(x) * u
    n, bits = _exponent(-mx.abs(x))
    return _swiglu(x, u.astype(mx.float32), n, mx.view(bits, mx.float32))


@partial(mx.compile, shapeless=True)
def _shifted_exp(s, m, n, scale):
    return _exp_nonpositive(s - m, n, scale)


def softmax(scores: mx.array) -> mx.array:
    """Softmax over the last axis, in float32, with the exp above."""
    scores = scores.astype(mx.float32)
    m = scores.max(axis=-1, keepdims=True)
    n, bits = _exponent(scores - m)
    e = _shifted_exp(scores, m, n, mx.view(bits, mx.float32))
    return e / e.sum(axis=-1, keepdims=True)


# --------------------------------------------------------------------------- attention
#
# On the CPU, mx.fast.scaled_dot_product_attention falls back to composed ops
# that score every query against every key, masked ones included, and read
# each KV head once per query head. :func:`cpu_attention` scores the query
# heads of a KV head with one product, and runs causal prefill in blocks of
# ATTENTION_BLOCK queries that stop at the last key they can see, so about
# half the scores (and their exponentials, the dominant cost) are never made.
# 8 query heads, 2 KV heads, D = 256, 2-core x86 with OpenBLAS, ms per layer:
#
#   T = 2048:  1104 fallback;  1182 unblocked, 870 blocks of 512, 812 of 256, 648 of 128
#   T = 512:     93 fallback;  78 blocks of 256, 63 of 128
#   decode against 2048 keys: 3.2 fallback, 2.4 ours
ATTENTION_BLOCK = 128


def cpu_attention(q: mx.array, k: mx.array, v: mx.array, scale: float, causal: bool) -> mx.array:
    """Softmax attention in float32; q [B, H, L, D] are the last L of k, v's S positions [B, Hkv, S, D]."""
    B, H, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    rep, past = H // Hkv, S - L
    f32, dtype = mx.float32, q.dtype
    q = (q.astype(f32) * scale).reshape(B, Hkv, rep, L, D)
    kt, v = k.astype(f32).swapaxes(-1, -2), v.astype(f32)
    block = ATTENTION_BLOCK if causal else L
    outs = []
    for s0 in range(0, L, block):
        s1 = min(s0 + block, L)
        n = past + s1 if causal else S  # keys this block can see
        scores = (q[:, :, :, s0:s1].reshape(B, Hkv, -1, D) @ kt[..., :n]).reshape(B, Hkv, rep, s1 - s0, n)
        if causal:
            visible = mx.arange(n)[None] <= mx.arange(past + s0, past + s1)[:, None]
            scores = mx.where(visible, scores, -mx.inf)
        p = softmax(scores).reshape(B, Hkv, -1, n)
        outs.append((p @ v[:, :, :n]).reshape(B, Hkv, rep, s1 - s0, D))
    out = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=3)
    return out.reshape(B, H, L, D).astype(dtype)


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


@mx.compile
def _conv_taps(xs: mx.array, w: mx.array) -> mx.array:
    """Causal depthwise conv of xs [B, T + K - 1, C] with taps w [C, K].

    A K-tap sum of shifted slices: exact, and cheaper than a grouped conv
    here; compiled, one pass instead of 2K - 1.
    """
    K = w.shape[1]
    T = xs.shape[1] - K + 1
    out = xs[:, 0:T] * w[:, 0]
    for j in range(1, K):
        out = out + xs[:, j : j + T] * w[:, j]
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
            cache[0] = xs[:, -(K - 1) :]
        out = _conv_taps(xs, self.conv1d.weight[:, :, 0].astype(x.dtype))
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
        return project(self.out_proj, y.astype(x.dtype).reshape(B, T, -1))


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
        if _on_cpu() and isinstance(k, mx.array) and (mask is None or isinstance(mask, str)):
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

    def hidden_states(
        self,
        inputs: Optional[mx.array],
        cache: Optional[list[Any]] = None,
        input_embeddings: Optional[mx.array] = None,
        positions: Optional[mx.array] = None,
        rope_delta: int = 0,
    ) -> mx.array:
        h = input_embeddings if input_embeddings is not None else self.embed_tokens(inputs)
        if cache is None:
            cache = [None] * len(self.layers)
        attn_cache = next((c for c, l in zip(cache, self.layers) if not l.is_linear), None)
        attn_mask = create_attention_mask(h, attn_cache)
        for layer, c in zip(self.layers, cache):
            h = layer(h, c, None if layer.is_linear else attn_mask, positions, rope_delta)
        return self.norm(h)

    def logits(self, h: mx.array) -> mx.array:
        return project(self.embed_tokens if self.cfg.tie_word_embeddings else self.lm_head, h)
