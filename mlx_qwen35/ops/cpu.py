"""Numerics for MLX's CPU backend: projections, activations and attention.

Off the CPU (Metal), or with ``MLX_QWEN35_PORTABLE=1``, each function runs
MLX's own operation; on the CPU it routes around the backend's slow spots,
measured on the 2-core x86 machine with OpenBLAS at the 2B shape (figures
beside each choice).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn

from .blas import portable


def cpu_paths() -> bool:
    """Whether to take the CPU paths here: MLX computes on the CPU and portable mode is off."""
    return mx.default_device() == mx.cpu and not portable()


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
    if not cpu_paths():
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
# MLX's CPU exp is a scalar loop at ~23 ns an element, 60 times a multiply,
# and every SiLU, sigmoid and softmax pays it. Here exp(a), a <= 0, is
# 2^n exp(r): n = round(a / ln 2), r = a - n ln 2 with ln 2 split in two
# (Cody-Waite) so r is exact, exp(r) by Cephes' minimax polynomial on
# |r| <= ln 2 / 2, and 2^n built in the float's exponent bits. Relative error
# 2e-7 (a couple of ulp), where MLX's own exp and sigmoid reach 3.8e-6.
#
# Written so that MLX's CPU compiler makes each step one vectorized loop:
# - the bit trick (a view) cannot fuse, so r, the bits of 2^n, exp and its
#   use are four kernels, each with one output (outputs that share
#   intermediates split a kernel; exp fused into its use ran slower, 42
#   against 11 + 22 ms);
# - no graph deeper than 10 operations (MLX fuses to depth 11; beyond, it
#   materializes intermediates and passes constants as strided inputs);
# - no floor (a libm call per element): n is rounded with 1.5 * 2^23;
# - no select of a constant (compiled to a mispredicted branch): the
#   sigmoid's numerator is max(e, [x >= 0]);
# - compiled per input shape: shapeless compilation broadcasts both operands
#   of every array-scalar operation, doubling the depth.
# SiLU(g) * u at [2048, 6144] (2-core x86, best of 5): 80 ms, against 191
# for its shapeless two-pass predecessor and 358 for nn.silu; the softmax of
# [1, 2, 512, 2048] scores 18 ms, 28 and 56 (mx.softmax). A 2B prefill,
# this design and its predecessor alternating in one process: 2048 tokens
# 42.9-43.9 s against 60.8-67.1 s, 1024 tokens 22.6-27.9 s against 30.5-42.6.
_LOG2E = 1.4426950408889634
_LN2_HI, _LN2_LO = 0.693359375, -2.12194440e-4
_EXP_MIN = -87.33  # about ln 2^-126: exp of anything smaller is not a normal float32
_EXP_POLY = (5.0000001201e-1, 1.6666665459e-1, 4.1665795894e-2, 8.3334519073e-3, 1.3981999507e-3, 1.9875691500e-4)
_ROUND = 1.5 * 2**23  # (y + _ROUND) - _ROUND is y rounded to an integer, for |y| < 2^22
_SHAPES_KEPT = 32


def per_shape_compile(fn):
    """``fn`` compiled for each input shape, the last _SHAPES_KEPT shapes kept, per thread.

    Each shape gets its own compiled copy, so evicting one frees its compile
    cache entry: prompts of ever new lengths (and decode's growing attention
    scores) do not grow MLX's cache, whose entries are scanned on every call.
    MLX keeps that cache per thread and frees an entry only in the thread that
    drops the function, so each thread keeps its own copies: an entry left in
    another thread would be found by the next function at the same address.
    """
    local = threading.local()

    def call(*args):
        kernels = local.__dict__.setdefault("kernels", OrderedDict())
        key = tuple((a.shape, a.dtype) for a in args)
        kernel = kernels.pop(key, None)
        if kernel is None:
            kernel = mx.compile(lambda *a: fn(*a))
        kernels[key] = kernel
        if len(kernels) > _SHAPES_KEPT:
            kernels.popitem(last=False)
        return kernel(*args)

    return call


def _reduce(a):
    """n and r with exp(a) = 2^n exp(r), for a <= 0."""
    a = mx.maximum(a, _EXP_MIN)
    n = (a * _LOG2E + _ROUND) - _ROUND
    return n, (a - n * _LN2_HI) - n * _LN2_LO


def _scale_bits(a):
    """The bits of the float32 2^n; 0 where exp(a) is below the normal floats."""
    n, _ = _reduce(a)
    return ((n.astype(mx.int32) + 127) << 23) & -(a >= _EXP_MIN).astype(mx.int32)


def _exp(r, scale):
    """2^n exp(r), the polynomial grouped shallow: 1 + r + r^2 (c0 + c1 r) + r^4 (...)."""
    c = _EXP_POLY
    r2 = r * r
    low = (1.0 + r) + r2 * (c[0] + c[1] * r)
    high = (c[2] + c[3] * r) + r2 * (c[4] + c[5] * r)
    return (low + (r2 * r2) * high) * scale


def _sigmoid(x, e):
    """sigmoid(x) as (numerator, denominator), given e = exp(-|x|) <= 1."""
    return mx.maximum(e, (x >= 0).astype(mx.float32)), 1.0 + e


_exp_kernel = per_shape_compile(_exp)


def _exp_of(arg):
    """x -> exp(arg(x)) for arg(x) <= 0: r and the bits of 2^n (each fusing arg), then exp."""
    remainder = per_shape_compile(lambda x: _reduce(arg(x))[1])
    scale_bits = per_shape_compile(lambda x: _scale_bits(arg(x)))
    return lambda x: _exp_kernel(remainder(x), mx.view(scale_bits(x), mx.float32))


_exp_neg_abs = _exp_of(lambda x: -mx.abs(x))
_exp_nonpositive = _exp_of(lambda a: a)


@per_shape_compile
def _gated(x, u, e):
    num, den = _sigmoid(x, e)
    return (u * num) / den


@per_shape_compile
def _swiglu(x, u, e):
    num, den = _sigmoid(x, e)
    return (x * u * num) / den


def sigmoid_mul(x: mx.array, u: mx.array) -> mx.array:
    """u * sigmoid(x), in float32 (``silu(x)`` is ``sigmoid_mul(x, x)``); MLX's own off the CPU."""
    x = x.astype(mx.float32)
    if not cpu_paths():
        return u * mx.sigmoid(x)
    return _gated(x, u.astype(mx.float32), _exp_neg_abs(x))


def swiglu(x: mx.array, u: mx.array) -> mx.array:
    """silu(x) * u, in float32; MLX's own off the CPU."""
    x = x.astype(mx.float32)
    if not cpu_paths():
        return nn.silu(x) * u
    return _swiglu(x, u.astype(mx.float32), _exp_neg_abs(x))


def softmax(scores: mx.array) -> mx.array:
    """Softmax over the last axis, in float32, with the exp above."""
    scores = scores.astype(mx.float32)
    e = _exp_nonpositive(scores - scores.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# --------------------------------------------------------------------------- attention
#
# On the CPU, mx.fast.scaled_dot_product_attention falls back to composed ops
# that score every query against every key, masked ones included, and read
# each KV head once per query head. :func:`cpu_attention` scores the query
# heads of a KV head with one product, and runs causal prefill in blocks of
# ATTENTION_BLOCK queries that stop at the last key they can see, so about
# half the scores (and their exponentials, the dominant cost) are never made.
# 8 query heads, 2 KV heads, D = 256, ms per layer (with mx.softmax):
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
        qb = q[:, :, :, s0:s1].reshape(B, Hkv, -1, D)
        if outs:
            # One block at a time: left to itself the scheduler makes every
            # block's scores before any is reduced (1 GiB against 4k keys).
            qb = mx.depends(qb, outs[-1])
        scores = (qb @ kt[..., :n]).reshape(B, Hkv, rep, s1 - s0, n)
        if causal:
            visible = mx.arange(n)[None] <= mx.arange(past + s0, past + s1)[:, None]
            scores = mx.where(visible, scores, -mx.inf)
        p = softmax(scores).reshape(B, Hkv, -1, n)
        outs.append((p @ v[:, :, :n]).reshape(B, Hkv, rep, s1 - s0, D))
    out = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=3)
    return out.reshape(B, H, L, D).astype(dtype)
