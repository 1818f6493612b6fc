"""The gated delta recurrence as one Metal kernel (``gated_delta.metal``, beside this file).

One launch walks all T steps with the state in registers (the file's header
gives the geometry). Each instantiation checks itself against
:func:`.recurrence.reference` the first time it would run; :mod:`.dispatch`
decides when to run it, and what runs instead when its check fails.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path
from typing import Optional

import mlx.core as mx

from .recurrence import reference

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "gated_delta.metal"


# Launch geometry and template constants of gated_delta.metal. LANES
# lanes share a value row: 32 (one row per SIMD-group, most parallelism) for
# decode, where a step is a single pass over the state; 4 (eight rows per
# SIMD-group, two shuffle levels instead of five, 32 state registers per
# lane) for long sequential runs, where each step's latency is the chain of
# two reductions. Not measured: no Apple GPU here; the choice follows the
# arithmetic above and mlx-lm's experience with its packed Dk=128 kernel.
DECODE_T = 16
LANES = (32, 16, 8, 4, 2, 1)


def choose_lanes(T: int, Dk: int, Dv: int) -> Optional[int]:
    """LANES for T steps of Dk x Dv heads, or None when no power of two fits."""
    preferred = 32 if T <= DECODE_T else 4
    for lanes in (preferred, *LANES):
        if Dk % lanes == 0 and Dv % (32 // lanes) == 0:
            return lanes
    return None


@lru_cache(maxsize=1)
def _kernel():
    return mx.fast.metal_kernel(
        name="qwen35_gated_delta",
        input_names=["q", "k", "v", "g", "beta", "state_in", "mask", "T"],
        output_names=["y", "state_out"],
        source=SOURCE.read_text(),
    )


def _launch(q, k, v, g, beta, state, mask, lanes: int) -> dict:
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


def run(q, k, v, g, beta, state, mask, lanes: int):
    y, state = _kernel()(**_launch(q, k, v, g, beta, state, mask, lanes))
    return y, state


# Kernel instantiations that passed their self-check, and whether none failed.
_checked: set[tuple] = set()
_healthy = True


def self_check(q, k, v, mask, lanes: int) -> bool:
    """Run this instantiation once on a small input against :func:`reference`.

    Each instantiation (dtypes, head shapes, lanes, mask) is its own Metal
    compile, so each is checked the first time it would run. On a compile
    error or a mismatch, warn once and disable the kernel for the rest of the
    process. The check's inputs are constants, so it also works while
    ``mx.compile`` traces a caller.
    """
    global _healthy
    Hk, Dk = q.shape[-2:]
    Hv, Dv = v.shape[-2:]
    sig = (q.dtype, k.dtype, v.dtype, Hk, Hv, Dk, Dv, lanes, mask is not None)
    if sig in _checked:
        return True
    if not _healthy:
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
        y, s = run(qs, ks, vs, gs, bs, s0, ms, lanes)
        problem = _problem(y, s, *reference(qs, ks, vs, gs, bs, s0, ms))
    except Exception as e:  # a Metal compile error surfaces here, at evaluation
        problem = f"{type(e).__name__}: {e}"
    if problem is None:
        _checked.add(sig)
        return True
    _healthy = False
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


def _problem(y, state, y_ref, state_ref) -> Optional[str]:
    """What is wrong with a kernel's (y, state) against the reference's, or None."""
    for name, x, ref, tol in (("state", state, state_ref, STATE_TOL), ("y", y, y_ref, Y_TOL[y.dtype])):
        x, ref = x.astype(mx.float32), ref.astype(mx.float32)
        err = (mx.abs(x - ref).max() / mx.abs(ref).max()).item()
        if not err <= tol:  # NaN fails too
            return f"{name} off by {err:.2e} of its largest entry (bound {tol:.0e})"
    return None
