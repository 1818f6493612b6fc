"""Numerics for MLX's CPU backend: activations, softmax, attention and the conv.

Each routes around a slow spot of the CPU backend (bench/NOTES.md has the
A/B figures and how to measure them); :mod:`.dispatch` decides when they run,
and runs MLX's own operations elsewhere. The float32-BLAS projections are in
:mod:`.linear`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import mlx.core as mx


# --------------------------------------------------------------------------- activations
#
# MLX's CPU exp is a scalar loop, far slower than a multiply, and every
# SiLU, sigmoid and softmax pays it. Here exp(a), a <= 0, is 2^n exp(r):
# n = round(a / ln 2), r = a - n ln 2 with ln 2 split in two (Cody-Waite) so
# r is exact, exp(r) by Cephes' minimax polynomial on |r| <= ln 2 / 2, and
# 2^n built in the float's exponent bits: a couple of ulp, more accurate than
# MLX's own exp and sigmoid.
#
# Written so that MLX's CPU compiler makes each step one vectorized loop:
# - the bit trick (a view) cannot fuse, so r, the bits of 2^n, exp and its
#   use are four kernels, each with one output (outputs that share
#   intermediates split a kernel; exp fused into its use ran slower);
# - no graph deeper than 10 operations (MLX fuses to depth 11; beyond, it
#   materializes intermediates and passes constants as strided inputs);
# - no floor (a libm call per element): n is rounded with 1.5 * 2^23;
# - no select of a constant (compiled to a mispredicted branch): the
#   sigmoid's numerator is max(e, [x >= 0]);
# - compiled per input shape: shapeless compilation broadcasts both operands
#   of every array-scalar operation, doubling the depth.
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
    """u * sigmoid(x), in float32 (``silu(x)`` is ``sigmoid_mul(x, x)``)."""
    x = x.astype(mx.float32)
    return _gated(x, u.astype(mx.float32), _exp_neg_abs(x))


def swiglu(x: mx.array, u: mx.array) -> mx.array:
    """silu(x) * u, in float32."""
    x = x.astype(mx.float32)
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
# Smaller blocks skip more scores; 128 was the fastest size tried (bench/NOTES.md).
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


# --------------------------------------------------------------------------- conv


@per_shape_compile
def conv_taps(xs: mx.array, w: mx.array) -> mx.array:
    """Causal depthwise conv of xs [B, T + K - 1, C] with taps w [K, C].

    A K-tap sum of shifted slices: exact, and cheaper than the CPU backend's
    grouped conv; compiled, one pass instead of 2K - 1.
    """
    K = w.shape[0]
    T = xs.shape[1] - K + 1
    out = xs[:, 0:T] * w[0]
    for j in range(1, K):
        out = out + xs[:, j : j + T] * w[j]
    return out
