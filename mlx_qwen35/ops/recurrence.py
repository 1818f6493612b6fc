"""The gated delta rule recurrence behind every Gated DeltaNet layer.

Per value head, with state S [Dv, Dk] in float32::

    S   <- g_t * S
    δ_t  = β_t (v_t - S k_t)
    S   <- S + δ_t k_tᵀ
    y_t  = S q_t

Conventions follow ``mx.fast.gated_delta_update``: q, k [B, T, Hk, Dk] (q
l2-normalised and scaled, k l2-normalised), v [B, T, Hv, Dv], g the decay in
linear space [B, T, Hv], beta [B, T, Hv], state [B, Hv, Dv, Dk]. Value head h
reads key head h // (Hv / Hk). Masked steps ([B, T] False) leave the state
untouched and output zeros.

Four implementations, one entry point (:func:`gated_delta_update`):

* ``reference``: the plain sequential recurrence, the ground truth.
* ``chunked``: chunk-parallel (WY/UT form) in MLX ops, for any device.
* ``metal``: the custom kernel in ``gated_delta.metal`` beside it (Apple GPUs).
* ``fast``: MLX's own ``mx.fast.gated_delta_update``.

``auto`` picks one per device, T and shape (see :func:`choose_method`); the
``MLX_QWEN35_GDN_METHOD`` environment variable overrides it. Any thread may
call it, one after another or at once.
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import Optional

import mlx.core as mx

from .blas import portable
from ..errors import Qwen35Error

log = logging.getLogger(__name__)

METHODS = ("auto", "reference", "chunked", "metal", "fast")
ENV_METHOD = "MLX_QWEN35_GDN_METHOD"
KERNEL_SOURCE = Path(__file__).parent / "gated_delta.metal"


# --------------------------------------------------------------------------- reference


@mx.compile
def _step(q, k, v, g, beta, state):
    # q, k [B, H, Dk]; v [B, H, Dv]; g, beta [B, H]; state [B, H, Dv, Dk]
    state = state * g[..., None, None]
    delta = (v - (state @ k[..., None])[..., 0]) * beta[..., None]
    state = state + delta[..., None] * k[..., None, :]
    return (state @ q[..., None])[..., 0], state


def reference(q, k, v, g, beta, state=None, mask=None):
    """The plain sequential recurrence in float32: the ground truth."""
    B, T, Hk, Dk = q.shape
    Hv, Dv = v.shape[-2:]
    if state is None:
        state = mx.zeros((B, Hv, Dv, Dk), dtype=mx.float32)
    if Hv != Hk:
        q = mx.repeat(q, Hv // Hk, axis=2)
        k = mx.repeat(k, Hv // Hk, axis=2)
    f32 = mx.float32
    q, k, v, g, beta = (x.astype(f32) for x in (q, k, v, g, beta))
    ys = []
    for t in range(T):
        y, new_state = _step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], state)
        if mask is not None:
            m = mask[:, t, None, None]
            y = mx.where(m, y, 0.0)
            new_state = mx.where(m[..., None], new_state, state)
        state = new_state
        ys.append(y)
    return mx.stack(ys, axis=1), state


# --------------------------------------------------------------------------- chunked
#
# Within a chunk of C steps starting from state S (cumulative decays
# γ_t = g_1⋯g_t, pairwise decays P[t, s] = g_{s+1}⋯g_t, decays to the chunk
# end r_s = P[C, s]), the updates δ_t = β_t (v_t - g_t S_{t-1} k_t) solve a
# unit lower-triangular system:
#
#     (I + A) Δ = diag(β) V - diag(βγ) K Sᵀ,    A[t, s] = β_t P[t, s] k_t·k_s  (s < t)
#
# With T⁻¹ = (I + A)⁻¹ and M = (P ∘ Q Kᵀ) on s ≤ t, the chunk's outputs and
# the next state are affine in S:
#
#     diag(r) Δ = diag(r) T⁻¹ diag(β) V - diag(r) T⁻¹ diag(βγ) K Sᵀ
#     Y         = M T⁻¹ diag(β) V + (diag(γ) Q - M T⁻¹ diag(βγ) K) Sᵀ
#     S'ᵀ       = γ_C Sᵀ + Kᵀ diag(r) Δ
#
# so each chunk is summarised by two [2C, D] operands, rhs (the S-free part
# of [diag(r) Δ; Y]) and lhs (its coefficient of Sᵀ), built for many chunks
# at once with C×C algebra and batched matmuls. The carry across chunks is
# then one addmm for [diag(r) Δ; Y] and one for the state, per chunk.
#
# Decays are multiplied in linear space, never divided and never logged:
# P is a cumulative product down each column, so g = 0 (a decay that
# underflowed) or g = 1e-30 gives exact zeros or tiny values, never 0/0, inf
# or the cancellation of log-space differences. Padding and masked steps use
# g = 1, β = 0 and k = v = 0, which makes them the identity on the state.
#
# Tuned at the 2B shape (16 heads, 128 x 128) on the 2-core Linux x86 CPU
# with OpenBLAS, `python bench/recurrence.py --tune` (interleaved best-of
# runs on a shared machine whose load moved figures by ±30%; tokens/s):
# - T <= 3: plain fused steps (C = 1) beat a chunk (T = 3: 2980 vs 2000).
# - T <= 32: one chunk of T (T = 8: 7220 vs 6030 at C = 4; T = 32: 13.3k
#   vs 11.2k at C = 16).
# - Longer: chunks of at most 16 (T = 512: 15.0k at C = 16, 10.3k at 32,
#   8.9k at 8, 5.3k at 64; T = 2048: 11.6k, 8.6k, 10.5k, 4.5k). Larger C
#   shortens the carry (each chunk reads and rewrites the whole state) but
#   grows the C×C algebra; carrying pairs of 16-chunks with one state update
#   was slower still (210 vs 155 ms of CPU at T = 2048).
# - SEGMENT: tokens prepared at once, on a second stream while the carry
#   of the segment before runs, so the two cores share the work (the carry
#   alone is ~60% of it). T = 2048: 25.3k at 128, 22.9k at 64, 20.7k at
#   256; T = 8192: 21.6k, 17.3k, 17.6k; on one stream: 16-19k. With the
#   overlap C = 16 still wins (T = 2048: 28-30k against 26-29k at C = 32
#   and 19-22k at C = 8). Putting the output rows on the second stream as
#   well made it slower (110 vs 80 ms): a cross-stream wait per chunk.
# - mx.compile pays only for the decode step's small vector algebra: compiled,
#   _prepare took 6.1 ms instead of 4.2 per 256 tokens and the carry 12.4
#   instead of 11.2 (the CPU backend's fused kernels lose to its eager ops on
#   these broadcast shapes).
SEGMENT = 128
SINGLE_STEP_T = 3
SINGLE_CHUNK_T = 32
MAX_CHUNK = 16

def _prepare(k, q, v, g, beta):
    """lhs, rhs [N,B,H,2C,D] and the chunk decays γ_C [N,B,H,1,1].

    k, q [N,B,H,C,Dk]; v [N,B,H,C,Dv]; g, beta [N,B,H,C]; all float32.
    """
    C = g.shape[-1]
    idx = mx.arange(C)
    strict = idx[:, None] > idx[None, :]
    P = mx.cumprod(mx.where(strict, g[..., :, None], 1.0), axis=-2)
    gam = mx.cumprod(g, axis=-1)
    kt = k.swapaxes(-1, -2)
    A = mx.where(strict, beta[..., :, None] * P * (k @ kt), 0.0)
    M = mx.where(idx[:, None] >= idx[None, :], P * (q @ kt), 0.0)
    # LAPACK's trtri: exact forward substitution (products of powers of A
    # cancel catastrophically for repeated keys). CPU-only in MLX, so it
    # runs on the CPU stream whatever the default device.
    cpu = mx.default_device() == mx.cpu
    tinv = mx.linalg.tri_inv(A + mx.eye(C), stream=None if cpu else mx.cpu)
    rt_mt = mx.concatenate([P[..., -1, :, None] * tinv, M @ tinv], axis=-2)
    # [0; diag(γ)] Q as a product: on the CPU backend the flops cost less
    # than a concatenation pass over Q.
    gq = mx.concatenate([mx.zeros_like(tinv), gam[..., :, None] * mx.eye(C)], axis=-2)
    lhs = mx.addmm(gq @ q, rt_mt * -(beta * gam)[..., None, :], k)
    rhs = (rt_mt * beta[..., None, :]) @ v
    return lhs, rhs, gam[..., -1:, None]


@mx.compile
def _step_vectors(q, k, v, g, beta, skq):
    # skq = S [k q] [B,H,Dv,2]; returns y and δ [B,H,Dv]
    g = g[..., None]
    delta = beta[..., None] * (v - g * skq[..., 0])
    return g * skq[..., 1] + (k * q).sum(-1, keepdims=True) * delta, delta


def _single_step(q, k, v, g, beta, S):
    # The chunk formulas at C = 1 (no triangular system): one pass over the
    # state S [B,H,Dv,Dk] for S k and S q, one for the update. Eager addmm
    # beats a compiled broadcast update on the CPU backend.
    y, delta = _step_vectors(q, k, v, g, beta, S @ mx.stack([k, q], axis=-1))
    return y, mx.addmm(g[..., None, None] * S, delta[..., None], k[..., None, :])


def chunked(q, k, v, g, beta, state=None, mask=None, chunk: Optional[int] = None):
    """Chunk-parallel recurrence in float32 (same results as :func:`reference`).

    ``chunk`` is the chunk size (default: :func:`chunk_size` of T); the last
    chunk is padded with identity steps.
    """
    B, T, Hk, Dk = q.shape
    Hv, Dv = v.shape[-2:]
    f32 = mx.float32
    q, k, v, g, beta = (x.astype(f32) for x in (q, k, v, g, beta))
    if mask is not None:
        # Zero q, k, v too: non-finite padding must not reach the products.
        m = mask[..., None]
        g, beta = mx.where(m, g, 1.0), mx.where(m, beta, 0.0)
        q, k, v = (mx.where(m[..., None], x, 0.0) for x in (q, k, v))
    if Hv != Hk:
        q = mx.repeat(q, Hv // Hk, axis=2)
        k = mx.repeat(k, Hv // Hk, axis=2)
    S = mx.zeros((B, Hv, Dv, Dk), dtype=f32) if state is None else state.astype(f32)
    C = min(chunk or chunk_size(T), T)
    ys = []
    if C == 1:
        for t in range(T):
            y, S = _single_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], S)
            ys.append(y[:, None])
    else:
        pad = -T % C
        if pad:
            widths = lambda x: [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)
            q, k, v, beta = (mx.pad(x, widths(x)) for x in (q, k, v, beta))
            g = mx.pad(g, widths(g), constant_values=1.0)
        st = S.swapaxes(-1, -2)
        seg = max(C, SEGMENT // C * C)
        # A segment's preparation needs nothing from the carry, so it runs
        # on a stream of its own: the next segment is prepared while this
        # one is carried (each CPU stream has its own thread).
        prep = _side_stream(mx.default_device().type) if T + pad > seg else mx.default_stream(mx.default_device())
        for t0 in range(0, T + pad, seg):
            N = min(seg, T + pad - t0) // C
            with mx.stream(prep):
                # [B, T, H, D] -> [N, B, H, C, D]: one chunk per leading index
                lay = lambda x: x[:, t0 : t0 + N * C].reshape(B, N, C, Hv, -1).transpose(1, 0, 3, 2, 4)
                # k and q feed two products each: lay them out once.
                kc, qc = mx.contiguous(lay(k)), mx.contiguous(lay(q))
                lhs, rhs, gc = _prepare(kc, qc, lay(v), *(lay(x)[..., 0] for x in (g, beta)))
            for n in range(N):
                x = mx.addmm(rhs[n], lhs[n], st)  # [diag(r) Δ; Y]
                ys.append(x[..., C:, :].swapaxes(1, 2))
                st = mx.addmm(gc[n] * st, kc[n].swapaxes(-1, -2), x[..., :C, :])
        S = st.swapaxes(-1, -2)
    y = mx.concatenate(ys, axis=1)[:, :T]
    if mask is not None:
        y = mx.where(mask[..., None, None], y, 0.0)
    return y, S


@lru_cache(maxsize=None)
def _side_stream(device_type: mx.DeviceType) -> mx.ThreadLocalStream:
    # A stream belongs to the thread that made it: each calling thread gets its own.
    return mx.new_thread_local_stream(mx.Device(device_type))


def chunk_size(T: int) -> int:
    """The chunk size :func:`chunked` uses for T steps (1: plain fused steps).

    Past one chunk, at most MAX_CHUNK, spread evenly over the chunks so that
    padding stays below one step per chunk.
    """
    if T <= SINGLE_STEP_T:
        return 1
    if T <= SINGLE_CHUNK_T:
        return T
    n = -(-T // MAX_CHUNK)
    return -(-T // n)


# --------------------------------------------------------------------------- metal
#
# Launch geometry and template constants of gated_delta.metal. LANES
# lanes share a value row: 32 (one row per SIMD-group, most parallelism) for
# decode, where a step is a single pass over the state; 4 (eight rows per
# SIMD-group, two shuffle levels instead of five, 32 state registers per
# lane) for long sequential runs, where each step's latency is the chain of
# two reductions. Not measured: no Apple GPU here; the choice follows the
# arithmetic above and mlx-lm's experience with its packed Dk=128 kernel.
METAL_DECODE_T = 16
_LANES = (32, 16, 8, 4, 2, 1)


def _metal_lanes(T: int, Dk: int, Dv: int) -> Optional[int]:
    preferred = 32 if T <= METAL_DECODE_T else 4
    for lanes in (preferred, *_LANES):
        if Dk % lanes == 0 and Dv % (32 // lanes) == 0:
            return lanes
    return None


@lru_cache(maxsize=1)
def _metal_kernel():
    return mx.fast.metal_kernel(
        name="qwen35_gated_delta",
        input_names=["q", "k", "v", "g", "beta", "state_in", "mask", "T"],
        output_names=["y", "state_out"],
        source=KERNEL_SOURCE.read_text(),
    )


def _metal_launch(q, k, v, g, beta, state, mask, lanes: int) -> dict:
    """The kernel call's arguments: inputs, template, grid, threadgroup, outputs."""
    B, T, Hk, Dk = q.shape
    Hv, Dv = v.shape[-2:]
    f32 = mx.float32
    if state is None:
        state = mx.zeros((B, Hv, Dv, Dk), dtype=f32)
    return dict(
        inputs=[
            q,
            k,
            v,
            g.astype(f32),
            beta.astype(f32),
            state.astype(f32),
            mx.ones((1,), dtype=mx.bool_) if mask is None else mask,
            T,
        ],
        template=[
            ("YT", v.dtype),
            ("Dk", Dk),
            ("Dv", Dv),
            ("Hk", Hk),
            ("Hv", Hv),
            ("LANES", lanes),
            ("HAS_MASK", int(mask is not None)),
        ],
        grid=(32, Dv // (32 // lanes), B * Hv),
        threadgroup=(32, 4, 1),
        output_shapes=[(B, T, Hv, Dv), (B, Hv, Dv, Dk)],
        output_dtypes=[v.dtype, f32],
    )


def _run_metal(q, k, v, g, beta, state, mask, lanes: int):
    y, state = _metal_kernel()(**_metal_launch(q, k, v, g, beta, state, mask, lanes))
    return y, state


# Kernel instantiations that passed their self-check, and whether none failed.
_metal_checked: set[tuple] = set()
_metal_healthy = True


def _metal_self_check(q, k, v, mask, lanes: int) -> bool:
    """Run this instantiation once on a small input against :func:`reference`.

    Each instantiation (dtypes, head shapes, lanes, mask) is its own Metal
    compile, so each is checked the first time it would run. On a compile
    error or a mismatch, warn once and disable the kernel for the rest of the
    process. The check's inputs are constants, so it also works while
    ``mx.compile`` traces a caller.
    """
    global _metal_healthy
    Hk, Dk = q.shape[-2:]
    Hv, Dv = v.shape[-2:]
    sig = (q.dtype, k.dtype, v.dtype, Hk, Hv, Dk, Dv, lanes, mask is not None)
    if sig in _metal_checked:
        return True
    if not _metal_healthy:
        return False
    B, T = 2, 5
    key = iter(mx.random.split(mx.random.key(0), 6))
    qs, ks = (mx.random.normal((B, T, Hk, Dk), key=next(key)) for _ in range(2))
    qs = (qs * mx.rsqrt((qs * qs).sum(-1, keepdims=True) * Dk)).astype(q.dtype)
    ks = (ks * mx.rsqrt((ks * ks).sum(-1, keepdims=True))).astype(k.dtype)
    vs = mx.random.normal((B, T, Hv, Dv), key=next(key)).astype(v.dtype)
    gs = mx.random.uniform(0.5, 1.0, (B, T, Hv), key=next(key))
    bs = mx.random.uniform(0.0, 1.0, (B, T, Hv), key=next(key))
    s0 = mx.random.normal((B, Hv, Dv, Dk), key=next(key))
    ms = None if mask is None else mx.array([[True] * T, [False, False] + [True] * (T - 2)])
    try:
        y, s = _run_metal(qs, ks, vs, gs, bs, s0, ms, lanes)
        problem = _self_check_problem(y, s, *reference(qs, ks, vs, gs, bs, s0, ms))
    except Exception as e:  # a Metal compile error surfaces here, at evaluation
        problem = f"{type(e).__name__}: {e}"
    if problem is None:
        _metal_checked.add(sig)
        return True
    _metal_healthy = False
    log.warning(
        "mlx_qwen35: the Metal gated-delta kernel failed its self-check (%s); from now on the "
        "recurrence runs through mx.fast.gated_delta_update where MLX fuses it, else the reference.",
        problem,
    )
    return False


# The self-check's bounds on the largest entry's error, relative to the largest
# reference entry: the state is float32 throughout; y is rounded to its dtype.
STATE_TOL = 1e-4
Y_TOL = {mx.float32: 1e-4, mx.float16: 2e-3, mx.bfloat16: 1e-2}


def _self_check_problem(y, state, y_ref, state_ref) -> Optional[str]:
    """What is wrong with a kernel's (y, state) against the reference's, or None."""
    for name, x, ref, tol in (("state", state, state_ref, STATE_TOL), ("y", y, y_ref, Y_TOL[y.dtype])):
        x, ref = x.astype(mx.float32), ref.astype(mx.float32)
        err = (mx.abs(x - ref).max() / mx.abs(ref).max()).item()
        if not err <= tol:  # NaN fails too
            return f"{name} off by {err:.2e} of its largest entry (bound {tol:.0e})"
    return None


# --------------------------------------------------------------------------- dispatch


def _on_metal() -> bool:
    return mx.default_device() == mx.gpu and mx.metal.is_available()


def _has_fast() -> bool:
    # MLX releases before 0.32.4 lack it.
    return hasattr(mx.fast, "gated_delta_update")


# The (Hk, Hv) pairs MLX 0.32.4 builds its fused kernel for (GatedDeltaUpdate::use_fallback).
FUSED_HEADS = frozenset({(16, 16), (16, 32), (16, 48), (16, 64), (24, 24), (32, 32)})


def fast_is_fused(Hk: int, Hv: int, Dk: int, Dv: int, masked: bool) -> bool:
    """Whether ``mx.fast.gated_delta_update`` runs MLX's fused Metal kernel here.

    Otherwise it builds a per-step loop of ops: on a CPU, with a mask, with
    heads other than 128 × 128, or with head counts it has no kernel for.
    """
    fused_shape = Dk == Dv == 128 and (Hk, Hv) in FUSED_HEADS
    return _has_fast() and _on_metal() and not masked and fused_shape


def _gpu_fallback(Hk: int, Hv: int, Dk: int, Dv: int, masked: bool) -> str:
    """The GPU method when our kernel cannot run: MLX's fused kernel, else our compiled step loop.

    Not ``chunked``: its triangular inverse runs on a CPU stream. Not an unfused
    ``fast``: MLX's per-step op loop, where ``reference`` runs one compiled step.
    """
    return "fast" if fast_is_fused(Hk, Hv, Dk, Dv, masked) else "reference"


def choose_method(T: int, Hk: int, Hv: int, Dk: int, Dv: int, masked: bool = False) -> str:
    """The method ``auto`` runs for T steps of Hk key and Hv value heads, Dk × Dv, on the default device.

    CPU (2-core Linux x86, OpenBLAS; ``python bench/recurrence.py``): chunked
    wins at every T, its C = 1 fused steps included, over reference and
    ``mx.fast.gated_delta_update``, which on the CPU runs a sequential loop
    (tokens/s at T = 1: 3150 against 1520 and 1250; at T = 2048: 26.4k
    against 2040 and 1180).

    Apple GPU (reasoned, not measured here): our kernel for decode and short
    runs, where one launch reads and writes the state once; MLX's own
    chunk-parallel Metal kernel (``fast``) for longer prefill, where
    parallelism across the chunk beats a sequential walk over T, when MLX
    fuses it (:func:`fast_is_fused`); else our kernel.

    ``MLX_QWEN35_PORTABLE=1``: ``fast`` on any device, what a Mac runs.
    """
    if _on_metal():
        lanes = _metal_lanes(T, Dk, Dv)
        if fast_is_fused(Hk, Hv, Dk, Dv, masked) and (T > METAL_DECODE_T or lanes is None):
            return "fast"
        return "metal" if lanes else _gpu_fallback(Hk, Hv, Dk, Dv, masked)
    if portable() and _has_fast():
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
    """Run the recurrence over T steps; returns ``(y [B,T,Hv,Dv], state)``.

    ``y`` has the dtype of ``v``; the state is float32. ``method`` is one of
    ``auto`` (or the ``MLX_QWEN35_GDN_METHOD`` environment variable when set),
    ``reference``, ``chunked``, ``metal`` (Apple GPU) or ``fast``
    (``mx.fast.gated_delta_update``).
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
    if method == "auto" or (method == "fast" and not _has_fast()):
        method = choose_method(T, Hk, Hv, Dk, Dv, masked)
    if method == "metal":
        if not mx.metal.is_available():
            raise Qwen35Error(
                "gated_delta_update: method='metal' needs an Apple GPU (mx.metal.is_available() is False)"
            )
        lanes = _metal_lanes(T, Dk, Dv)
        if lanes is None:
            raise Qwen35Error(
                f"gated_delta_update: the Metal kernel needs Dk={Dk} divisible by a power of two"
                f" L <= 32 with Dv={Dv} divisible by 32 / L"
            )
        if _metal_self_check(q, k, v, mask, lanes):
            return _run_metal(q, k, v, g, beta, state, mask, lanes)
        method = _gpu_fallback(Hk, Hv, Dk, Dv, masked)
    if method == "fast":
        # MLX casts g to q's dtype: bf16 q and k would round the decay.
        f32 = mx.float32
        y, state = mx.fast.gated_delta_update(*(x.astype(f32) for x in (q, k, v, g, beta)), state, mask)
    elif method == "chunked":
        y, state = chunked(q, k, v, g, beta, state, mask)
    else:
        y, state = reference(q, k, v, g, beta, state, mask)
    return y.astype(v.dtype), state.astype(mx.float32)
