"""The CPU numerics of mlx_qwen35.ops against MLX's own operations, at the 2B's shapes.

    python bench/cpu_ops.py                       # every section
    python bench/cpu_ops.py --only attention      # one of: projections, decode, activations, attention, conv

Milliseconds per call, best of ``--rounds`` interleaved rounds, ours beside
the operation MLX's graph runs instead (what ``MLX_QWEN35_PORTABLE=1`` runs).
Run it on the CPU; on Linux it re-runs itself on OpenBLAS when that is
installed (bench/common.py). bench/NOTES.md keeps the figures.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import race, use_fast_blas  # noqa: E402

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

from mlx_qwen35.ops import cpu, dispatch, linear, native  # noqa: E402

ROUNDS = 5


def show(title: str, best: dict) -> None:
    print(f"{title:<44}" + "".join(f"{name:>16}: {t * 1e3:8.1f} ms" for name, t in best.items()), flush=True)


def projections() -> None:
    """A 6144 x 2048 weight (the MLP's up projection) in bf16 and 4-bit."""
    lin = nn.Linear(2048, 6144, bias=False)
    lin.set_dtype(mx.bfloat16)
    q = nn.QuantizedLinear.from_linear(lin, group_size=64, bits=4)
    mx.eval(lin.parameters(), q.parameters())
    linear.HALF_BLAS_ROWS = 1  # time the cast at one row too: the threshold's reason
    for kind, layer, rows_list in (("bf16", lin, (1, 128)), ("4-bit", q, (1, 16))):
        for rows in rows_list:
            x = mx.random.normal((1, rows, 2048)).astype(mx.bfloat16)
            fns = {"native": lambda: layer(x), "float32": lambda: linear.float32_product(layer, x)}
            show(f"{kind} projection, {rows} rows", race(fns, ROUNDS))


# The 2B's decode projections (N, K): MLP up / gate and the DeltaNet's qkv, MLP down, the DeltaNet's z and
# out, attention's gated q, its k / v, and the tied output head.
SHAPES = ((6144, 2048), (2048, 6144), (2048, 2048), (4096, 2048), (512, 2048), (248320, 2048))


def decode() -> None:
    """One row times a float32 weight (the MLP's up projection, the tied output head): MLX's products and
    the gemv route. Eight up projections take turns, more than the L3 cache holds, as a decode step's do."""
    side = mx.new_stream(mx.cpu)
    for n, copies in ((6144, 8), (248320, 1)):
        layers = [nn.Linear(2048, n, bias=False) for _ in range(copies)]
        mx.eval([m.parameters() for m in layers])
        x = mx.random.normal((1, 1, 2048))
        turn = iter(range(1 << 30))
        w = lambda: layers[next(turn) % copies].weight

        def two_streams():
            wi = w()
            top = x @ wi[: n // 2].T
            with mx.stream(side):
                bottom = x @ wi[n // 2 :].T
            return mx.concatenate([top, bottom], axis=-1)

        fns = {
            "x @ W.T": lambda: x @ w().T,
            "W @ x": lambda: w() @ x[0, 0],
            "addmm": lambda: mx.addmm(mx.zeros((1, 1, n)), x, w().T),
            "2 streams": two_streams,
            "numpy gemv": lambda: linear.gemv_product(layers[next(turn) % copies], x, "numpy"),
            "native": lambda: linear.gemv_product(layers[next(turn) % copies], x, "native"),
        }
        best = race(fns, ROUNDS)
        show(f"float32 [1, 2048] x [{n}, 2048]", best)
        gbs = {k: f"{n * 2048 * 4 / t / 1e9:.1f} GB/s" for k, t in best.items()}
        print(f"{'':<44}" + "".join(f"{k:>16}: {v:>11}" for k, v in gbs.items()), flush=True)
        del layers
    few_rows()


def few_rows() -> None:
    """Decode's 1 to 8 rows (a sequence, a draft to verify, a batch) on the 2B's projections: numpy's route
    (a gemv per row up to 3 rows, else an sgemm) against our kernel on float32 and bfloat16 weights, with
    GB/s of weight read and numpy's time over each. Copies take turns, more than the L3 cache holds."""
    if not native.available():
        print("the native kernel could not be compiled: no comparison")
        return
    print(f"{'rows x weight':<30}{'numpy route':>14}{'native float32':>34}{'native bfloat16':>34}")
    for n, k in SHAPES:
        copies = max(1, -(-(96 << 20) // (n * k * 4)))
        f32 = [nn.Linear(k, n, bias=False) for _ in range(copies)]
        bf16 = [nn.Linear(k, n, bias=False) for _ in range(copies)]
        for layer in bf16:
            layer.set_dtype(mx.bfloat16)
        mx.eval([m.parameters() for m in f32 + bf16])
        turn = iter(range(1 << 30))
        for rows in range(1, 9) if n < 100000 else (1, 2, 4, 8):
            x = mx.random.normal((1, rows, k))
            fns = {
                "numpy": lambda: linear.gemv_product(f32[next(turn) % copies], x, "numpy"),
                "f32": lambda: linear.gemv_product(f32[next(turn) % copies], x, "native"),
                "bf16": lambda: linear.gemv_product(bf16[next(turn) % copies], x, "native"),
            }
            best = race(fns, ROUNDS)
            cells = [f"{best['numpy'] * 1e3:8.2f} ms"]
            for name, size in (("f32", 4), ("bf16", 2)):
                t = best[name]
                cells.append(f"{t * 1e3:8.2f} ms {n * k * size / t / 1e9:5.1f} GB/s {best['numpy'] / t:5.2f}x")
            line = f"[{rows}, {k}] x [{n}, {k}]".ljust(30) + cells[0].rjust(14)
            print(line + "".join(c.rjust(34) for c in cells[1:]), flush=True)
        del f32, bf16

def activations() -> None:
    x, u = mx.random.normal((2048, 6144)) * 4, mx.random.normal((2048, 6144))
    s = mx.random.normal((1, 2, 512, 2048)) * 8
    mx.eval(x, u, s)
    fns = {"nn.silu": lambda: nn.silu(x) * u, "ours": lambda: cpu.swiglu(x, u)}
    show("SiLU(g) * u, [2048, 6144]", race(fns, ROUNDS))
    fns = {"mx.softmax": lambda: mx.softmax(s, axis=-1), "ours": lambda: cpu.softmax(s)}
    show("softmax, [1, 2, 512, 2048]", race(fns, ROUNDS))


def attention() -> None:
    """8 query heads, 2 KV heads, D = 256: causal prefill of T tokens, and one decode step."""
    H, Hkv, D = 8, 2, 256
    for T, L in ((512, 512), (2048, 2048), (2048, 1)):
        q = mx.random.normal((1, H, L, D))
        k, v = mx.random.normal((1, Hkv, T, D)), mx.random.normal((1, Hkv, T, D))
        mx.eval(q, k, v)
        mask = "causal" if L > 1 else None
        fns = {"mx.fast": lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=D**-0.5, mask=mask)}
        fns["ours"] = lambda: cpu.cpu_attention(q, k, v, D**-0.5, causal=L > 1)
        show(f"attention, {L} queries over {T} keys", race(fns, ROUNDS))


def conv() -> None:
    """The Gated DeltaNet's depthwise conv: 4 taps over 6144 channels."""
    T, C, K = 2048, 6144, 4
    xs, w = mx.random.normal((1, T + K - 1, C)), mx.random.normal((C, K, 1))
    mx.eval(xs, w)
    taps = mx.contiguous(w[:, :, 0].T)
    fns = {"mx.conv1d": lambda: mx.conv1d(xs, w, groups=C), "taps": lambda: cpu.conv_taps(xs, taps)}
    show(f"causal conv, T = {T}", race(fns, ROUNDS))


SECTIONS = {
    "projections": projections,
    "decode": decode,
    "activations": activations,
    "attention": attention,
    "conv": conv,
}


def main() -> None:
    global ROUNDS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=SECTIONS, nargs="+", default=list(SECTIONS))
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    args = parser.parse_args()
    ROUNDS = args.rounds
    print(f"BLAS: {use_fast_blas()}; default device: {mx.default_device()}; CPU paths: {dispatch.cpu_paths()}")
    for name in args.only:
        SECTIONS[name]()


if __name__ == "__main__":
    main()
