"""Multi-turn prefill cost and long-context memory: ours against mlx-lm, from one run.

    python bench/sessions.py          # re-runs itself on OpenBLAS when installed (Linux)
    ... --part turns      # only the scripted chat (2B shape)
    ... --part memory     # only peak memory at 1k/4k/16k (0.8B shape)

turns: a scripted 10-turn chat on the 2B-shaped random model, float32, greedy,
16-token replies. Ours restores a cache snapshot and prefills from there. mlx-lm
has no way to rewind a hybrid cache, so a template-faithful chat with it re-renders
and re-prefills the whole conversation every turn ("mlx-lm full"); its own
`mlx_lm.chat` instead appends each new user turn to the live cache ("mlx-lm chat"),
which is cheap but keeps past reasoning and the raw stop token in the context,
unlike the template the model was trained with.

memory: peak MLX memory after prefilling 1k, 4k and 16k tokens into a fresh cache
on the 0.8B-shaped random model (same KV and state per token as 2B), float32,
without and with the 8- and 4-bit KV cache.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import use_fast_blas  # noqa: E402
from model import greedy, load_pair  # noqa: E402
from random_checkpoint import default_checkpoint  # noqa: E402

USER = [
    "Hello! Can you help me plan a small vegetable garden on my balcony?",
    "It gets about five hours of sun. Which vegetables would do well?",
    "How big should the pots be for tomatoes and peppers?",
    "What soil mix do you recommend for containers?",
    "How often should I water them in summer?",
    "Should I use fertilizer, and which kind?",
    "How do I keep aphids away without chemicals?",
    "Can I grow herbs in the same pots as the tomatoes?",
    "When should I start the seeds indoors?",
    "Thanks! Can you summarise the plan in three lines?",
]
REPLY_TOKENS = 16


def load_both(path: Path):
    """Ours, mlx-lm's (sharing our weight arrays, so peak memory counts them once) and the tokenizer."""
    from mlx_qwen35.tokenizer import load_tokenizer

    return (*load_pair(path, "float32"), load_tokenizer(path))


def turns(path: Path):
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache

    from mlx_qwen35.chat import Chat
    from mlx_qwen35.sampling import Sampling
    from mlx_qwen35.tokenizer import render_prompt

    ours, theirs, tok = load_both(path)
    chat = Chat(ours, tok, sampling=Sampling(temperature=0), max_tokens=REPLY_TOKENS)
    rows = []
    live = make_prompt_cache(theirs)  # mlx_lm.chat's way: one cache, only new turns appended
    for i, text in enumerate(USER):
        r = chat.ask(text)
        ours_t = r.prefilled_tokens / r.prompt_tps

        # mlx-lm full: the whole conversation so far, rendered by the template, from an empty cache
        full = render_prompt(tok, chat.messages[:-1])
        t0 = time.perf_counter()
        steps = generate_step(mx.array(full), theirs, max_tokens=1, sampler=greedy)
        next(steps)
        full_t = time.perf_counter() - t0

        # mlx-lm chat: only the new user turn, continuing the live cache
        new = render_prompt(tok, [{"role": "user", "content": text}])
        t0 = time.perf_counter()
        steps = generate_step(mx.array(new), theirs, max_tokens=REPLY_TOKENS, sampler=greedy, prompt_cache=live)
        next(steps)
        chat_t = time.perf_counter() - t0
        for _ in steps:
            pass
        rows.append((i + 1, r.prefilled_tokens, ours_t, len(full), full_t, len(new), chat_t))
    print(f"\n[turns] 2B shape, float32, replies of {REPLY_TOKENS} tokens; prefill tokens and seconds per turn")
    print(f"{'turn':>4} {'ours tok':>9} {'ours s':>7} {'full tok':>9} {'full s':>7} {'chat tok':>9} {'chat s':>7}"
          f" {'full/ours':>10}")
    for n, ot, os_, ft, fs, ct, cs in rows[1:]:
        print(f"{n:>4} {ot:>9} {os_:>7.2f} {ft:>9} {fs:>7.2f} {ct:>9} {cs:>7.2f} {fs / os_:>9.1f}x")
    tot = [sum(r[k] for r in rows[1:]) for k in (1, 2, 3, 4)]
    print(f" 2-10 {tot[0]:>9} {tot[1]:>7.2f} {tot[2]:>9} {tot[3]:>7.2f} {'':>17} {tot[3] / tot[1]:>9.1f}x")


def memory(path: Path):
    from mlx_lm.generate import generate_step

    from mlx_qwen35.engine import prefill

    ours, theirs, _ = load_both(path)
    weights = mx.get_active_memory() / 2**30
    print(f"\n[memory] 0.8B shape, float32: peak GiB after prefilling a fresh cache"
          f" (both include the {weights:.2f} GiB of weights they share)")
    print(f"{'context':>8} {'kv':>5} {'ours':>8} {'mlx-lm':>8} {'ratio':>7}")
    for n in (1024, 4096, 16384):
        ids = [1000 + (i % 5000) for i in range(n)]
        for bits in (None, 8, 4):
            gc.collect()
            mx.clear_cache()
            mx.reset_peak_memory()
            cache = ours.make_cache(kv_bits=bits)
            mx.eval(prefill(ours, ids, cache))
            mine = mx.get_peak_memory() / 2**30
            del cache
            gc.collect()
            mx.clear_cache()
            mx.reset_peak_memory()
            kw = {} if bits is None else dict(kv_bits=bits, kv_group_size=64, quantized_kv_start=0)
            next(generate_step(mx.array(ids), theirs, max_tokens=1, sampler=greedy, **kw))
            ref = mx.get_peak_memory() / 2**30
            print(f"{n:>8} {bits or 'fp32':>5} {mine:>8.2f} {ref:>8.2f} {mine / ref:>6.2f}x", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["turns", "memory", "all"], default="all")
    a = ap.parse_args()
    blas = use_fast_blas()
    print(f"mlx {mx.__version__}, device {mx.default_device()}, BLAS: {blas}")
    if a.part in ("turns", "all"):
        turns(default_checkpoint("qwen3_5_2b"))
    if a.part in ("memory", "all"):
        memory(default_checkpoint("qwen3_5_0_8b"))


if __name__ == "__main__":
    main()
