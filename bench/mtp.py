"""Speculative decoding with the MTP head on the 2B-shaped random model: what verifying costs, what drafting pays.

    python bench/mtp.py                    # float32, after a 128-token prompt
    python bench/mtp.py --tokens 16 --rounds 1

1. The cost of one forward over k + 1 tokens (a verify pass, each recurrent
   layer keeping its per-step states) against one decode step, k = 1..4.
2. The cost of drafting one token with the head (the full 248k-row output
   head, and the first 32k rows only).
3. Greedy decode tokens/s with MTP off, and on with an oracle draft that is
   right with probability 0, 0.5, 0.8 and 1 (the plain greedy output is the
   oracle), for k = 1..3, the draft count fixed, drafting over the full
   output head and over its first 32k rows; then the real random head with
   the adaptive count (random weights draft wrong: the 0 % case).

Each figure is the best of ``--rounds``; the ratio is to plain decoding.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import use_fast_blas  # noqa: E402
from random_checkpoint import default_checkpoint  # noqa: E402

from mlx_qwen35.engine import decode_tokens, prefill  # noqa: E402
from mlx_qwen35.loading import load_model  # noqa: E402
from mlx_qwen35.model import cache as hybrid  # noqa: E402
from mlx_qwen35.reasoning import ThinkingControl  # noqa: E402
from mlx_qwen35.sampler import make_sampler  # noqa: E402
from mlx_qwen35.sampling import Sampling  # noqa: E402
from mlx_qwen35.speculative import DraftPolicy, DraftStats, draft_head, speculative_tokens  # noqa: E402

GREEDY = Sampling(temperature=0)


def best(fn, rounds: int) -> float:
    fn()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def primed(model, prompt):
    cache = model.make_cache(mtp=True)
    return cache, prefill(model, prompt, cache)


def forward_cost(model, prompt, rounds: int) -> dict[int, float]:
    """Seconds of one forward over T tokens (T > 1 recorded, as a verify pass), rolled back after each."""
    lm = model.language_model
    cache, _ = primed(model, prompt)
    main = cache[:-1]
    before, snap = hybrid.offset(main), hybrid.snapshot(main)
    out = {}
    for T in range(1, 6):
        def once():
            hybrid.record(main, T > 1)
            h = lm.hidden_states(mx.array([[7] * T]), main)
            hybrid.record(main, False)
            mx.eval(lm.logits(h)[0], [c.state for c in main])
            hybrid.restore(main, snap, before)
        out[T] = best(once, rounds)
    return out


def draft_cost(model, rounds: int) -> dict[str, float]:
    """Seconds to draft one token: the head's layer and one output head."""
    lm = model.language_model
    cache, _ = primed(model, list(range(1000, 1128)))
    g = mx.zeros((1, lm.cfg.hidden_size))
    out = {}
    for name, vocab in (("full head", None), ("32k-row head", 32768)):
        head = draft_head(model, vocab)

        def once():
            x = model.mtp(lm.embed(mx.array([[7]])), g[:, None], cache[-1])
            mx.eval(mx.argmax(head(x[:, -1])[0]))
            cache[-1].trim(1)
        out[name] = best(once, rounds)
    return out


def decode_rate(model, prompt, n: int, k: int, hit: float = None, adaptive: bool = False, reference=None,
                draft_vocab=None):
    """Greedy tokens/s over n tokens: plain (k = 0), or drafting k (an oracle right with probability ``hit``)."""
    cache, logits = primed(model, prompt)
    control = ThinkingControl(None, reasoning=False, budget=None)
    stats = DraftStats()
    if k == 0:
        gen = decode_tokens(model, logits, cache, sampler=make_sampler(GREEDY), processors=[], control=control, max_tokens=n)
    else:
        rng = random.Random(0)
        propose = None
        if hit is not None:
            def propose(generated, drafts):
                i = len(generated)
                return [reference[i + j] if rng.random() < hit else reference[i + j] + 1 for j in range(len(drafts))]
        gen = speculative_tokens(model, logits, cache, sampling=GREEDY, processors=[], control=control, max_tokens=n,
                                 policy=DraftPolicy(k, adaptive=adaptive), stats=stats, propose=propose,
                                 draft_vocab=draft_vocab)
    t = time.perf_counter()
    tokens = list(gen)
    return len(tokens) / (time.perf_counter() - t), tokens, stats


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, help="default: bench/out/qwen3_5_2b-random (built if missing)")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=32, help="decoded tokens per run")
    ap.add_argument("--rounds", type=int, default=1)
    a = ap.parse_args()
    print(use_fast_blas())
    model = load_model(a.checkpoint or default_checkpoint(), dtype=mx.float32, mtp=True)
    model.cast(mx.float32)  # float32 weights (a CPU float32 run would keep the checkpoint's bf16 projections)
    prompt = list(range(1000, 1000 + a.prompt))

    fwd = forward_cost(model, prompt, a.rounds)
    print(f"\n1. one forward over T tokens (T > 1: a verify pass of k = T - 1 drafts), after {a.prompt} prompt tokens")
    for T, s in fwd.items():
        print(f"   T = {T}: {s * 1e3:7.0f} ms   {s / fwd[1]:.2f}× a decode step")
    print("\n2. drafting one token")
    for name, s in draft_cost(model, a.rounds).items():
        print(f"   {name}: {s * 1e3:6.0f} ms   {s / fwd[1]:.2f}× a decode step")

    _, reference, _ = decode_rate(model, prompt, a.tokens + 8, 0)  # the oracle's tokens (4 beyond: drafts at the end)
    plain = max(decode_rate(model, prompt, a.tokens, 0)[0] for _ in range(a.rounds))
    print(f"\n3. greedy decode, {a.tokens} tokens: plain {plain:.2f} tok/s")
    for label, vocab in (("full head", None), ("32k-row head", 32768)):
        for k in (1, 2, 3):
            cells = []
            for hit in (0.0, 0.5, 0.8, 1.0):
                runs = [decode_rate(model, prompt, a.tokens, k, hit, reference=reference, draft_vocab=vocab)
                        for _ in range(a.rounds)]
                rate, tokens, stats = max(runs, key=lambda r: r[0])
                assert tokens == reference[: a.tokens], "drafting changed the greedy output"
                cells.append(f"{hit:.0%}: {rate:5.2f} tok/s ({rate / plain:.2f}×)")
            print(f"   {label}, k = {k}   " + "   ".join(cells))
    for label, vocab in (("full head", None), ("32k-row head", 32768)):
        rate, tokens, stats = decode_rate(model, prompt, a.tokens, 3, adaptive=True, draft_vocab=vocab)
        assert tokens == reference[: a.tokens]
        print(f"   the random head ({label}), adaptive k ≤ 3: {rate:.2f} tok/s ({rate / plain:.2f}×), "
              f"{stats.accepted}/{stats.drafted} drafts accepted")


if __name__ == "__main__":
    main()
