"""Gated delta recurrence at the 2B shape: ours against mlx-lm and MLX, from one run.

    python bench/recurrence.py          # tokens/s at T = 1, 128, 512, 2048, 8192
    python bench/recurrence.py --tune   # the sweep behind ops.recurrence.chunk_size

One Gated DeltaNet layer's recurrence: B = 1, 16 heads, Dk = Dv = 128,
float32 inputs like the model's (unit keys, scaled unit queries, decays in
(0, 1)), a random initial state. Columns: our ``reference`` (sequential),
``chunked`` and ``auto`` (what the model runs), mlx-lm's CPU/training path
(``mlx_lm.models.gated_delta.gated_delta_ops``) and ``mx.fast.gated_delta_update``.
Each figure is the best of several runs, the candidates interleaved round
by round so that the ratios hold on a shared machine. On Linux the run
re-executes itself on OpenBLAS when it is installed (bench/common.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import race, use_fast_blas  # noqa: E402

import mlx.core as mx  # noqa: E402
from mlx_lm.models.gated_delta import gated_delta_ops  # noqa: E402

import mlx_qwen35.ops.recurrence as gd  # noqa: E402
from mlx_qwen35.ops import dispatch  # noqa: E402

B, H, D = 1, 16, 128


def inputs(T: int, seed: int = 0):
    key = iter(mx.random.split(mx.random.key(seed), 6))
    unit = lambda x: x / mx.linalg.norm(x, axis=-1, keepdims=True)
    q = unit(mx.random.normal((B, T, H, D), key=next(key))) * D**-0.5
    k = unit(mx.random.normal((B, T, H, D), key=next(key)))
    v = mx.random.normal((B, T, H, D), key=next(key))
    g = mx.exp(-mx.exp(mx.random.uniform(-3, 1, (B, T, H), key=next(key))))
    beta = mx.sigmoid(mx.random.normal((B, T, H), key=next(key)))
    state = mx.random.normal((B, H, D, D), key=next(key)) * 0.1
    mx.eval(q, k, v, g, beta, state)
    return q, k, v, g, beta, state


CANDIDATES = {
    "reference": lambda *a: gd.reference(*a),
    "chunked": lambda *a: dispatch.gated_delta_update(*a, method="chunked"),
    "auto": lambda *a: dispatch.gated_delta_update(*a),
    "mlx-lm": lambda *a: gated_delta_ops(*a),
    "mx.fast": lambda *a: mx.fast.gated_delta_update(*a),
}


def table(Ts: list[int]) -> None:
    print(f"{'T':>6} {'auto runs':>10}" + "".join(f"{name:>11}" for name in CANDIDATES), end="")
    print(f"{'auto/mlx-lm':>13}{'auto/mx.fast':>14}   (tokens/s)")
    for T in Ts:
        a = inputs(T)
        warm = inputs(min(T, 512))
        # The sequential paths take seconds per run at the longest T.
        best = race(
            {name: (lambda fn=fn: fn(*a)) for name, fn in CANDIDATES.items()},
            rounds=2 if T > 2048 else 5,
            warmups={name: (lambda fn=fn: fn(*warm)) for name, fn in CANDIDATES.items()},
        )
        tps = {name: T / t for name, t in best.items()}
        row = f"{T:>6} {dispatch.choose_method(T, H, H, D, D):>10}" + "".join(f"{tps[name]:>11.0f}" for name in CANDIDATES)
        print(row + f"{tps['auto'] / tps['mlx-lm']:>12.1f}x{tps['auto'] / tps['mx.fast']:>13.1f}x", flush=True)


def tune() -> None:
    sizes = (1, 2, 4, 8, 16, 32, 64)
    print("chunked tokens/s by chunk size C (C = 1: plain fused steps)")
    print(f"{'T':>6}" + "".join(f"{'C=' + str(c):>9}" for c in sizes) + f"{'mlx-lm':>9}")
    for T in (1, 2, 3, 4, 8, 16, 32, 64, 128, 512, 2048):
        a = inputs(T)
        fns = {c: (lambda c=c: gd.chunked(*a, chunk=c)) for c in sizes if c <= T}
        fns["mlx-lm"] = lambda: gated_delta_ops(*a)
        best = race(fns, rounds=3 if T > 512 else 8)
        cells = "".join(f"{T / best[c]:>9.0f}" if c in best else f"{'':>9}" for c in sizes)
        print(f"{T:>6}{cells}{T / best['mlx-lm']:>9.0f}", flush=True)
    T, chunk = 2048, gd.chunk_size(2048)
    a = inputs(T)
    print(f"\nT = {T}, C = {chunk}: tokens/s by SEGMENT (tokens prepared at once)")

    def at(seg):
        gd.SEGMENT = seg
        return gd.chunked(*a)

    best = race({seg: (lambda seg=seg: at(seg)) for seg in (64, 128, 256, 512, 1024, 2048)}, rounds=3)
    print("".join(f"{seg:>6}: {T / t:.0f}" for seg, t in best.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tune", action="store_true", help="sweep chunk size and segment length")
    parser.add_argument("--T", type=int, nargs="+", default=[1, 128, 512, 2048, 8192])
    args = parser.parse_args()
    print(f"BLAS: {use_fast_blas()}; default device: {mx.default_device()}")
    tune() if args.tune else table(args.T)


if __name__ == "__main__":
    main()
