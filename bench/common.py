"""Shared by the benchmarks: a fast BLAS on Linux, and interleaved best-of timings.

On Linux the figures mean little on MLX's bundled reference BLAS, so
:func:`use_fast_blas` re-runs the benchmark with the environment that
``mlx_qwen35.ops.blas.blas_env`` asks for (OpenBLAS preloaded, a core type it
recognises) when that library is installed.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Callable

import mlx.core as mx

from mlx_qwen35.ops.blas import blas_env, openblas_core, sgemm_provider

_HOPS = "_MLX_QWEN35_BENCH_BLAS_HOPS"


def use_fast_blas() -> str:
    """Re-exec on a fast BLAS when one is installed; returns what BLAS this run uses."""
    env = blas_env()
    hops = int(os.environ.get(_HOPS, "0"))
    installed = "LD_PRELOAD" not in env or Path(env["LD_PRELOAD"]).exists()
    if env and installed and hops < 2:  # preloading OpenBLAS may reveal a core type to set
        if "LD_PRELOAD" in env and os.environ.get("LD_PRELOAD"):
            env["LD_PRELOAD"] += " " + os.environ["LD_PRELOAD"]
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **env, _HOPS: str(hops + 1)})
    path = sgemm_provider()
    if path is None:
        return "MLX's bundled reference BLAS"
    core = openblas_core(path)
    return f"{path}" + (f" (OpenBLAS, {core} kernels)" if core else "")


def race(fns: dict[str, Callable[[], object]], rounds: int = 5, warmups: dict | None = None) -> dict[str, float]:
    """Best wall time of each ``fn`` (evaluated) over ``rounds`` interleaved rounds.

    Interleaving keeps the ratios honest on a shared machine, whose load
    drifts over seconds. ``warmups`` (default: the fns) run first, untimed.
    """
    for name, fn in fns.items():
        mx.eval((warmups or fns)[name]())
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            mx.eval(fn())
            best[name] = min(best[name], time.perf_counter() - t)
    return best
