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

Two of the four methods live here: ``reference``, the plain sequential
recurrence (the ground truth), and ``chunked``, chunk-parallel (WY/UT form)
in MLX ops for any device. The other two are the Metal kernel (:mod:`.metal`)
and MLX's own ``mx.fast.gated_delta_update``; :func:`.dispatch.gated_delta_update`
is the one entry point and picks among them. Any thread may call these, one
after another or at once.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional

import mlx.core as mx


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
# Chunk sizes and the segment length are the fastest of `python bench/recurrence.py --tune`
# on a 2-core x86 CPU (bench/NOTES.md): larger chunks shorten the carry but grow the C×C algebra.
# Only the decode step's small vector algebra is compiled: the CPU backend's
# fused kernels lose to its eager ops on the chunk's broadcast shapes.
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
