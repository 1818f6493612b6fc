"""Decode on the CPU against the memory bandwidth: ours on each route of the few-row products, and mlx-lm.

    python bench/decode.py                        # prompts of 128, 512 and 2048 tokens
    python bench/decode.py --prompts 128 --decode 4 --rounds 1 --checkpoint PATH
    python bench/decode.py --dtype bfloat16       # half the bytes, through our kernel

A decode step reads every weight once (the tied embedding table once, as the
output head), so its speed is bounded by the machine's read bandwidth,
measured first with numpy (the best of two threads' ``max`` and a BLAS gemv
over 1 GiB). Then, per prompt length, each side prefills its own cache once
and decodes in blocks of ``--decode`` greedy tokens that continue from there,
the sides taking turns for ``--rounds`` rounds: ours with our kernel
(``MLX_QWEN35_NATIVE=1``), ours with numpy's gemv (``MLX_QWEN35_NATIVE=0``;
float32 only), ours with MLX's matmul (``MLX_QWEN35_GEMV=0``, what ran
before), and mlx-lm on the same weight arrays; in float32 also ours as a
CPU user's float32 run loads it, the checkpoint's bf16 projections kept and
widened by our kernel as it reads them. Each figure is the best block's
tokens/s; GB/s is that times the bytes of weights that side reads a step.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import use_fast_blas  # noqa: E402
from model import load_pair  # noqa: E402
from random_checkpoint import default_checkpoint  # noqa: E402

from mlx_qwen35.ops.dispatch import ENV_GEMV, ENV_NATIVE  # noqa: E402

# Issue 16's llama.cpp figures (F32, BF16, Q4_K_M weights; 2 threads, a 2-core AVX-512 machine).
LLAMA_CPP = {"F32 (7.24 GiB)": 4.3, "BF16 (3.63 GiB)": 8.7, "Q4_K_M (1.22 GiB)": 19.6}
# Each side's switches (ours), or None (mlx-lm).
SIDES = {
    "ours, native": {ENV_GEMV: "1", ENV_NATIVE: "1"},
    "ours, numpy gemv": {ENV_GEMV: "1", ENV_NATIVE: "0"},
    "ours, MLX matmul": {ENV_GEMV: "0", ENV_NATIVE: "0"},
    "ours, bf16 weights": {ENV_GEMV: "1", ENV_NATIVE: "1"},  # float32 compute, the weights widened as read
    "mlx-lm": None,
}
MODEL_OF = {"mlx-lm": "mlx-lm", "ours, bf16 weights": "half"}  # which model a side runs; the rest: "ours"


def best_seconds(fn, reps: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def read_bandwidth() -> dict[str, float]:
    """GB/s of two numpy readings of 1 GiB of float32: two threads' ``max`` of a half each, and a BLAS gemv."""
    a = np.ones((1 << 17, 2048), dtype=np.float32)
    halves = np.split(a, 2)

    def two_threads():
        threads = [threading.Thread(target=np.max, args=(h,)) for h in halves]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    x = np.ones(2048, dtype=np.float32)
    return {
        "max, 2 threads": a.nbytes / best_seconds(two_threads) / 1e9,
        "BLAS gemv": a.nbytes / best_seconds(lambda: a @ x) / 1e9,
    }


def step_bytes(model) -> int:
    """Bytes of the weights one decode step reads: every language-model parameter once."""
    from mlx.utils import tree_flatten

    return sum(w.nbytes for _, w in tree_flatten(model.language_model.parameters()))


def prefill_ours(model, ids):
    from mlx_qwen35.engine import prefill

    cache = model.make_cache()
    return cache, prefill(model, ids, cache)


def prefill_theirs(model, ids):
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    x = mx.array(ids)[None]
    for s in range(0, len(ids), 2048):  # mlx-lm's default prefill step
        logits = model(x[:, s : s + 2048], cache=cache)
        mx.eval([c.state for c in cache])
    return cache, logits[0, -1]


def decode(model, cache, token: int, n: int) -> tuple[float, int]:
    """Seconds for ``n`` greedy steps from ``token``, each queued as the engine does; the last token."""
    t = time.perf_counter()
    for _ in range(n):
        y = mx.argmax(model(mx.array([[token]]), cache=cache)[0, -1])
        mx.async_eval(y)
        token = y.item()
    return time.perf_counter() - t, token


def measure(models: dict, T: int, n: int, rounds: int, sides: list[str]) -> dict[str, float]:
    """Best decode tokens/s of each side after a T-token prompt, blocks of n tokens taking turns."""
    ids = list(range(1000, 1000 + T))
    state = {}
    for who, model in models.items():
        cache, logits = (prefill_theirs if who == "mlx-lm" else prefill_ours)(model, ids)
        state[who] = [cache, int(mx.argmax(logits).item())]
    best = dict.fromkeys(sides, 0.0)
    for r in range(rounds):
        for side in sides if r % 2 == 0 else sides[::-1]:
            who = MODEL_OF.get(side, "ours")
            os.environ.update(SIDES[side] or {})
            seconds, state[who][1] = decode(models[who], state[who][0], state[who][1], n)
            best[side] = max(best[side], n / seconds)
    for name in (ENV_GEMV, ENV_NATIVE):
        os.environ.pop(name, None)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, nargs="+", default=[128, 512, 2048])
    ap.add_argument("--decode", type=int, default=8, help="tokens per timed block")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--checkpoint", type=Path, help="default: bench/out/qwen3_5_2b-random (built if missing)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    a = ap.parse_args()
    # numpy has no bfloat16 product: there that side would be MLX's matmul again.
    sides = [s for s in SIDES if a.dtype == "float32" or s not in ("ours, numpy gemv", "ours, bf16 weights")]
    blas = use_fast_blas()
    path = a.checkpoint or default_checkpoint("qwen3_5_2b")
    bw = read_bandwidth()
    peak = max(bw.values())
    print(f"checkpoint: {path}  (random weights, real shape)\nmlx {mx.__version__}, BLAS: {blas}")
    print("read bandwidth: " + ", ".join(f"{k} {v:.1f} GB/s" for k, v in bw.items()) + f"; taken as {peak:.1f}")
    ours, theirs = load_pair(path, a.dtype)
    models = {"ours": ours, "mlx-lm": theirs}
    if "ours, bf16 weights" in sides:  # a float32 run as users get it on a CPU: the checkpoint's bf16 projections kept
        from mlx_qwen35.loading import load_model

        models["half"] = load_model(path, dtype=mx.float32)
    nbytes = step_bytes(ours)
    print(f"weights read per decode step: {nbytes / 2**30:.2f} GiB -> at most {peak * 1e9 / nbytes:.2f} tokens/s")
    load = os.getloadavg()[0]
    print(f"\n{a.dtype} decode tokens/s (GB/s, % of {peak:.1f}), best block of {a.decode} tokens", end="")
    print(f" over {a.rounds} round(s)")
    print(f"{'prompt':>8}" + "".join(f"{s:>30}" for s in sides))
    for T in a.prompts:
        best = measure(models, T, a.decode, a.rounds, sides)
        cells = []
        for s in sides:
            gbs = best[s] * (step_bytes(models["half"]) if MODEL_OF.get(s) == "half" else nbytes) / 1e9
            cells.append(f"{best[s]:.2f} ({gbs:.1f} GB/s, {100 * gbs / peak:.0f}%)")
        print(f"{T:>8}" + "".join(f"{c:>30}" for c in cells), flush=True)
    print(f"load average {load:.1f} -> {os.getloadavg()[0]:.1f}")
    anchor = ", ".join(f"{k} {v}" for k, v in LLAMA_CPP.items())
    print(f"anchor, llama.cpp decode tokens/s (issue 16; 2 cores, AVX-512, another machine): {anchor}")


if __name__ == "__main__":
    main()
