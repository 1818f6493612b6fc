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
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx


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

    ``y`` has the dtype of ``v``; the state is float32.
    """
    y, state = reference(q, k, v, g, beta, state, mask)
    return y.astype(v.dtype), state
