"""Every CPU / Metal / portable decision, and the entry points that act on them.

The model graph calls :func:`swiglu`, :func:`attention`, :func:`causal_conv`,
:func:`gated_delta_update`, ... and never asks where it runs. Off the CPU (an
Apple GPU), or with ``MLX_QWEN35_PORTABLE=1``, each runs MLX's own operations;
on the CPU it runs the numerics of :mod:`.cpu`, which route around the CPU
backend's slow spots. The recurrence picks one of its four methods here.
"""

from __future__ import annotations

import os
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import scaled_dot_product_attention

from ..errors import Qwen35Error
from . import cpu, metal, native, recurrence

ENV_PORTABLE = "MLX_QWEN35_PORTABLE"
ENV_METHOD = "MLX_QWEN35_GDN_METHOD"
ENV_GEMV = "MLX_QWEN35_GEMV"
ENV_NATIVE = "MLX_QWEN35_NATIVE"
METHODS = ("auto", "reference", "chunked", "metal", "fast")


def portable() -> bool:
    """Whether ``MLX_QWEN35_PORTABLE=1`` asks for the op graph a Mac's GPU runs, on any device.

    It turns off every CPU-specific path (float32-BLAS projections, polynomial
    activations, blocked attention, the conv rewrite, the chunked two-stream
    recurrence), so CPU tests exercise what Metal runs.
    """
    return _switch(ENV_PORTABLE) is True


def _switch(name: str) -> Optional[bool]:
    """An on/off environment variable: True for 1, False for 0, None when unset or empty."""
    value = os.environ.get(name, "")
    if value not in ("", "0", "1"):
        raise Qwen35Error(f"{name}={value!r}: expected 1 (on) or 0 (off)")
    return None if value == "" else value == "1"


def cpu_paths() -> bool:
    """Whether to take the CPU paths here: MLX computes on the CPU and portable mode is off."""
    return mx.default_device() == mx.cpu and not portable()


def on_metal() -> bool:
    return mx.default_device() == mx.gpu and mx.metal.is_available()


# Up to this many rows the gemv route beats MLX's float32 matmul (bench/NOTES.md).
GEMV_ROWS = 8


def gemv_route(rows: int, weight_dtype: mx.Dtype) -> Optional[str]:
    """How ``rows`` rows times a ``weight_dtype`` weight run outside MLX (:func:`.linear.gemv_product`), or None.

    On the CPU paths, at most GEMV_ROWS rows (decode), unless
    ``MLX_QWEN35_GEMV=0``: MLX's CPU matmul runs even one row as a full sgemm
    that packs the weight. ``"native"``: our kernel (:mod:`.native`), which
    reads a float32 or bfloat16 weight once for all the rows, unless
    ``MLX_QWEN35_NATIVE=0`` or it could not be compiled. Else, and for one
    float32 row, ``"numpy"`` for float32 weights: numpy's BLAS, a gemv per row. Larger products (prefill)
    stay on MLX's. A route computes as the graph is built (it evaluates x).
    """
    if rows > GEMV_ROWS or weight_dtype not in (mx.float32, mx.bfloat16) or _switch(ENV_GEMV) is False:
        return None
    if not cpu_paths():
        return None
    if rows == 1 and weight_dtype == mx.float32:
        return "numpy"  # one float32 row: numpy's gemv streams it faster than our kernel (bench/NOTES.md)
    if _switch(ENV_NATIVE) is not False and native.available():
        return "native"
    return "numpy" if weight_dtype == mx.float32 else None


def widens_bf16() -> bool:
    """Whether a float32 run may keep bfloat16 projection weights: our kernel widens them as it reads.

    Prefill's products cast them a block of rows at a time (:mod:`.linear`).
    """
    return cpu_paths() and _switch(ENV_GEMV) is not False and _switch(ENV_NATIVE) is not False and native.available()


def drafting_pays() -> bool:
    """Whether speculative decoding with the MTP head is on by default: where verifying a few tokens costs about one step.

    On an Apple GPU decode is bandwidth-bound and k + 1 rows read the same
    weights; on the CPU each extra row still costs (bench/mtp.py).
    """
    return on_metal()


def has_fast() -> bool:
    # MLX releases before 0.32.4 lack it.
    return hasattr(mx.fast, "gated_delta_update")


# --------------------------------------------------------------------------- the graph's ops


def sigmoid_mul(x: mx.array, u: mx.array) -> mx.array:
    """u * sigmoid(x), in float32 (``silu(x)`` is ``sigmoid_mul(x, x)``)."""
    if cpu_paths():
        return cpu.sigmoid_mul(x, u)
    return u * mx.sigmoid(x.astype(mx.float32))


def swiglu(x: mx.array, u: mx.array) -> mx.array:
    """silu(x) * u, in float32."""
    if cpu_paths():
        return cpu.swiglu(x, u)
    return nn.silu(x.astype(mx.float32)) * u


def causal_conv(xs: mx.array, w: mx.array) -> mx.array:
    """Depthwise conv of xs [B, T + K - 1, C] with w [C, K, 1] (MLX's layout), valid part: [B, T, C]."""
    if cpu_paths():
        # Taps as contiguous rows: a column of [C, K] made the CPU kernel strided.
        return cpu.conv_taps(xs, mx.contiguous(w[:, :, 0].T))
    return mx.conv1d(xs, w, groups=xs.shape[-1])


def attention(q: mx.array, k: mx.array, v: mx.array, cache, scale: float, mask) -> mx.array:
    """Softmax attention of q [B, H, L, D] over k, v [B, Hkv, S, D], as mlx-lm's (quantized caches too)."""
    if cpu_paths() and isinstance(k, mx.array) and (mask is None or isinstance(mask, str)):
        return cpu.cpu_attention(q, k, v, scale, causal=mask is not None)
    return scaled_dot_product_attention(q, k, v, cache=cache, scale=scale, mask=mask)


# --------------------------------------------------------------------------- the recurrence's method


# The (Hk, Hv) pairs MLX 0.32.4 builds its fused kernel for (GatedDeltaUpdate::use_fallback).
FUSED_HEADS = frozenset({(16, 16), (16, 32), (16, 48), (16, 64), (24, 24), (32, 32)})


def fast_is_fused(Hk: int, Hv: int, Dk: int, Dv: int, masked: bool) -> bool:
    """Whether ``mx.fast.gated_delta_update`` runs MLX's fused Metal kernel here.

    Otherwise it builds a per-step loop of ops: on a CPU, with a mask, with
    heads other than 128 × 128, or with head counts it has no kernel for.
    """
    fused_shape = Dk == Dv == 128 and (Hk, Hv) in FUSED_HEADS
    return has_fast() and on_metal() and not masked and fused_shape


def gpu_fallback(Hk: int, Hv: int, Dk: int, Dv: int, masked: bool) -> str:
    """The GPU method when our kernel cannot run: MLX's fused kernel, else our compiled step loop.

    Not ``chunked``: its triangular inverse runs on a CPU stream. Not an unfused
    ``fast``: MLX's per-step op loop, where ``reference`` runs one compiled step.
    """
    return "fast" if fast_is_fused(Hk, Hv, Dk, Dv, masked) else "reference"


def choose_method(T: int, Hk: int, Hv: int, Dk: int, Dv: int, masked: bool = False) -> str:
    """The method ``auto`` runs for T steps of Hk key and Hv value heads, Dk × Dv, on the default device.

    CPU: chunked wins at every T, its C = 1 fused steps included, over
    reference and ``mx.fast.gated_delta_update``, which on the CPU runs a
    sequential loop (``python bench/recurrence.py``; bench/NOTES.md).

    Apple GPU (reasoned, not measured here): our kernel for decode and short
    runs, where one launch reads and writes the state once; MLX's own
    chunk-parallel Metal kernel (``fast``) for longer prefill, where
    parallelism across the chunk beats a sequential walk over T, when MLX
    fuses it (:func:`fast_is_fused`); else our kernel.

    ``MLX_QWEN35_PORTABLE=1``: ``fast`` on any device, what a Mac runs.
    """
    if on_metal():
        lanes = metal.choose_lanes(T, Dk, Dv)
        if fast_is_fused(Hk, Hv, Dk, Dv, masked) and (T > metal.DECODE_T or lanes is None):
            return "fast"
        return "metal" if lanes else gpu_fallback(Hk, Hv, Dk, Dv, masked)
    if portable() and has_fast():
        return "fast"
    return "chunked"


def _check(q, k, v, g, beta, state, mask) -> None:
    if q.ndim != 4 or k.shape != q.shape:
        raise Qwen35Error(f"gated_delta_update: q and k must be [B, T, Hk, Dk] alike, got {q.shape} and {k.shape}")
    B, T, Hk, Dk = q.shape
    if v.ndim != 4 or v.shape[:2] != (B, T) or v.shape[2] % Hk:
        raise Qwen35Error(
            f"gated_delta_update: v must be [B={B}, T={T}, Hv, Dv] with Hv a multiple of Hk={Hk}, got {v.shape}"
        )
    Hv, Dv = v.shape[-2:]
    for name, x in (("g", g), ("beta", beta)):
        if x.shape != (B, T, Hv):
            raise Qwen35Error(f"gated_delta_update: {name} must be [B, T, Hv] = {(B, T, Hv)}, got {x.shape}")
    if state is not None and state.shape != (B, Hv, Dv, Dk):
        raise Qwen35Error(
            f"gated_delta_update: state must be [B, Hv, Dv, Dk] = {(B, Hv, Dv, Dk)}, got {state.shape}"
        )
    if mask is not None and mask.shape != (B, T):
        raise Qwen35Error(f"gated_delta_update: mask must be [B, T] = {(B, T)}, got {mask.shape}")


def gated_delta_update(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    g: mx.array,
    beta: mx.array,
    state: Optional[mx.array] = None,
    mask: Optional[mx.array] = None,
    *,
    method: str = "auto",
) -> tuple[mx.array, mx.array]:
    """Run the recurrence (:mod:`.recurrence`) over T steps; returns ``(y [B,T,Hv,Dv], state)``.

    ``y`` has the dtype of ``v``; the state is float32. ``method`` is one of
    ``auto`` (or the ``MLX_QWEN35_GDN_METHOD`` environment variable when set),
    ``reference``, ``chunked``, ``metal`` (Apple GPU) or ``fast``
    (``mx.fast.gated_delta_update``). Any thread may call it.
    """
    _check(q, k, v, g, beta, state, mask)
    if method == "auto":
        method = os.environ.get(ENV_METHOD) or "auto"
        if method not in METHODS:
            raise Qwen35Error(f"{ENV_METHOD}={method!r}: expected one of {', '.join(METHODS)}")
    elif method not in METHODS:
        raise Qwen35Error(f"gated_delta_update: method={method!r}, expected one of {', '.join(METHODS)}")
    B, T, Hk, Dk = q.shape
    Hv, Dv = v.shape[-2:]
    if state is not None:
        state = state.astype(mx.float32)
    if mask is not None:
        mask = mask.astype(mx.bool_)
    if T == 0:
        y = mx.zeros((B, 0, Hv, Dv), dtype=v.dtype)
        return y, mx.zeros((B, Hv, Dv, Dk), mx.float32) if state is None else state
    masked = mask is not None
    if method == "auto" or (method == "fast" and not has_fast()):
        method = choose_method(T, Hk, Hv, Dk, Dv, masked)
    if method == "metal":
        if not mx.metal.is_available():
            raise Qwen35Error(
                "gated_delta_update: method='metal' needs an Apple GPU (mx.metal.is_available() is False)"
            )
        lanes = metal.choose_lanes(T, Dk, Dv)
        if lanes is None:
            raise Qwen35Error(
                f"gated_delta_update: the Metal kernel needs Dk={Dk} divisible by a power of two"
                f" L <= 32 with Dv={Dv} divisible by 32 / L"
            )
        if metal.self_check(q, k, v, mask, lanes):
            return metal.run(q, k, v, g, beta, state, mask, lanes)
        method = gpu_fallback(Hk, Hv, Dk, Dv, masked)
    if method == "fast":
        # MLX casts g to q's dtype: bf16 q and k would round the decay.
        f32 = mx.float32
        y, state = mx.fast.gated_delta_update(*(x.astype(f32) for x in (q, k, v, g, beta)), state, mask)
    elif method == "chunked":
        y, state = recurrence.chunked(q, k, v, g, beta, state, mask)
    else:
        y, state = recurrence.reference(q, k, v, g, beta, state, mask)
    return y.astype(v.dtype), state.astype(mx.float32)
