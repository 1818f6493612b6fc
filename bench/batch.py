"""Batched generation: ours (mlx_qwen35.batch.Batch) against mlx-lm's BatchGenerator, side by side.

Both run the same random-weight checkpoint (the real 2B shape by default),
float32, sharing the same weight arrays, greedy, B prompts of the same length
at B = 1, 2, 4, 8. Prefill is timed from the start to every sequence's first
sampled token (B × prompt tokens over it: batch prefill tokens/s); decode
from there to the last token (B × decode tokens over it: aggregate decode
tokens/s). mlx-lm's side is the generator under its ``batch_generate``, so
the two clocks start and stop at the same points. Rounds alternate ours,
mlx-lm, mlx-lm, ours, ...; each figure is the best of its rounds. On Linux the
script re-runs itself on OpenBLAS when it is installed:

    python bench/batch.py
    ... --batches 1,8 --prompt 64 --decode 8 --rounds 1
    ... --checkpoint PATH   # any Qwen3.5 checkpoint folder with a tokenizer
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import use_fast_blas  # noqa: E402
from model import greedy, load_pair  # noqa: E402
from random_checkpoint import default_checkpoint  # noqa: E402


def prompts_of(B: int, T: int) -> list[list[int]]:
    """B different prompts of T ordinary token ids."""
    return [list(range(1000 + 7 * b, 1000 + 7 * b + T)) for b in range(B)]


def run_ours(model, tokenizer, prompts, n):
    """Seconds to every first token and for the ``n`` tokens after it, and each sequence's tokens."""
    from mlx_qwen35.batch import Batch
    from mlx_qwen35.engine import Request
    from mlx_qwen35.media import PromptInputs
    from mlx_qwen35.sampling import Sampling

    batch = Batch(model, tokenizer, max_rows=len(prompts))
    for i, ids in enumerate(prompts):
        batch.add(i, Request(PromptInputs(ids), reasoning=False, sampling=Sampling(temperature=0), max_tokens=n + 1))
    tokens = {}
    t0 = time.perf_counter()
    batch.step()  # prefill, and the first tokens queued
    batch.step()  # the first tokens handed out, the next step queued
    t1 = time.perf_counter()
    while batch.active:
        tokens.update({e.key: e.result.tokens for e in batch.step() if e.result is not None})
    return t1 - t0, time.perf_counter() - t1, [tokens[i] for i in range(len(prompts))]


def run_theirs(model, tokenizer, prompts, n):
    from mlx_lm.generate import BatchGenerator

    B = len(prompts)
    gen = BatchGenerator(model, sampler=greedy, completion_batch_size=B, prefill_batch_size=B)
    uids = gen.insert(prompts, [n + 1] * B)
    tokens = {u: [] for u in uids}
    t0 = time.perf_counter()
    while not all(tokens.values()):
        for r in gen.next_generated():
            tokens[r.uid].append(r.token)
    t1 = time.perf_counter()
    while responses := gen.next_generated():
        for r in responses:
            tokens[r.uid].append(r.token)
    t2 = time.perf_counter()
    gen.close()
    return t1 - t0, t2 - t1, [tokens[u] for u in uids]


RUN = {"ours": run_ours, "mlx-lm": run_theirs}


def measure(models: dict, tokenizer, batches, T: int, n: int, rounds: int) -> tuple[dict, dict]:
    """{(who, B): (prefill tok/s, decode tok/s)}, best of ``rounds`` alternating rounds, and the tokens."""
    for who, model in models.items():
        RUN[who](model, tokenizer, prompts_of(2, 8), 2)  # warm-up
    best, tokens = {}, {}
    order = list(models)
    for r in range(rounds):
        for B in batches:
            prompts = prompts_of(B, T)
            for who in order if r % 2 == 0 else order[::-1]:
                mx.clear_cache()
                pre, dec, tokens[who, B] = RUN[who](models[who], tokenizer, prompts, n)
                row = (B * T / pre, B * n / dec)
                old = best.get((who, B), (0.0, 0.0))
                best[who, B] = tuple(max(a, b) for a, b in zip(old, row))
    return best, tokens


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, help="default: the 2B-shaped random checkpoint in bench/out/")
    ap.add_argument("--batches", default="1,2,4,8", help="comma-separated batch sizes")
    ap.add_argument("--prompt", type=int, default=128, help="tokens per prompt")
    ap.add_argument("--decode", type=int, default=16, help="decode tokens per sequence after the first")
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    blas = use_fast_blas()
    from mlx_qwen35.tokenizer import load_tokenizer

    path = a.checkpoint or default_checkpoint("qwen3_5_2b")
    batches = [int(b) for b in a.batches.split(",")]
    print(f"checkpoint: {path}\nmlx {mx.__version__}, device {mx.default_device()}, BLAS: {blas}")
    ours, theirs = load_pair(path, "float32")
    load = os.getloadavg()[0]
    res, tokens = measure({"ours": ours, "mlx-lm": theirs}, load_tokenizer(path), batches, a.prompt, a.decode, a.rounds)
    print(
        f"\n[batch] float32, greedy, prompts of {a.prompt} tokens, {a.decode} decode tokens per sequence, "
        f"best of {a.rounds} alternating round(s); load average {load:.1f} -> {os.getloadavg()[0]:.1f}"
    )
    print(f"{'case':<18}{'':>6}{'ours':>12}{'mlx-lm':>12}{'ratio':>8}")
    for B in batches:
        for i, label in enumerate(("prefill", "decode")):
            o, r = res["ours", B][i], res["mlx-lm", B][i]
            print(f"{f'{label} B={B}':<18}{'tok/s':>6}{o:>12.2f}{r:>12.2f}{o / r:>7.2f}x")
        same = sum(x == y for s, t in zip(tokens["ours", B], tokens["mlx-lm", B]) for x, y in zip(s, t))
        total = sum(len(s) for s in tokens["ours", B])
        print(f"{'same tokens':<18}{'':>6}{same:>12} of {total} (greedy; same weights)")
    if 1 in batches and len(batches) > 1:
        top = max(batches)
        o, r = (res[who, top][1] / res[who, 1][1] for who in ("ours", "mlx-lm"))
        print(f"{f'decode B={top} / B=1':<18}{'':>6}{o:>11.2f}x{r:>11.2f}x")


if __name__ == "__main__":
    main()
