"""Whole-model speed and memory: ours against mlx-lm, side by side, from one run.

Both run the same random-weight checkpoint at the real 2B shape, the same
prompt, the same dtype, with a greedy sampler. Prefill is timed to the first
sampled token, decode per token after it (each decode token is one forward
pass on both sides), peak memory is MLX's over the whole request. On Linux the
script re-runs itself on OpenBLAS when it is installed (see the README):

    python bench/model.py
    ... --only q4     # the slow 4-bit case alone (minutes on a CPU)

Sections: fp32-long (float32, 512 and 2048-token prompts), fp32 and bf16
(128-token prompt), q4 (4-bit, 16-token prompt, 4 decode tokens).

In float32 and bfloat16 both models hold the very same weight arrays (ours
are loaded, mlx-lm's model takes them over), so they fit in memory together
and the runs can alternate: ours, mlx-lm, mlx-lm, ours, ... for ``--rounds``
rounds. Each figure is the best of its rounds (speeds) or the largest (peak
memory); the load average is printed since other work on a shared machine
slows whichever side runs beside it.
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
from random_checkpoint import OUT, default_checkpoint  # noqa: E402

SECTIONS = {
    "fp32-long": dict(dtype="float32", prompts=(512, 2048), decode=8, rounds=2),
    "fp32": dict(dtype="float32", prompts=(128,), decode=16, rounds=3),
    "bf16": dict(dtype="bfloat16", prompts=(128,), decode=4, rounds=1),
    "q4": dict(dtype="q4", prompts=(16,), decode=4, rounds=1),
}


def greedy(logprobs):
    return mx.argmax(logprobs, axis=-1)


def load_pair(path: Path, dtype: str):
    """(ours, mlx-lm's) models of ``path`` in ``dtype``; in float dtypes they share weights."""
    from mlx_lm.utils import load_model as lm_load

    from mlx_qwen35.loading import load_model

    if dtype == "q4":
        return load_model(quantized(path, "ours")), lm_load(quantized(path, "mlx_lm"))[0]
    ours = load_model(path, dtype=getattr(mx, dtype))
    ours.cast(getattr(mx, dtype))  # all of it: a CPU float32 run would keep bf16 projections, here the same weights
    theirs, _ = lm_load(path, lazy=True)
    theirs.set_dtype(getattr(mx, dtype))
    share_weights(ours, theirs)
    return ours, theirs


def share_weights(ours, theirs) -> None:
    """Hand our matrices (every 2-D weight: embedding and projections) to mlx-lm's model.

    Both read them unchanged from the checkpoint, so the values are the same;
    sharing keeps one copy in memory. The small vectors (norms, conv, decay
    parameters) each side loads and evaluates itself.
    """
    from mlx.utils import tree_flatten, tree_unflatten

    theirs_params = dict(tree_flatten(theirs.parameters()))
    shared = []
    for name, w in tree_flatten(ours.language_model.parameters()):
        other = theirs_params.get(f"language_model.model.{name}")
        if w.ndim == 2 and other is not None and other.shape == w.shape and other.dtype == w.dtype:
            shared.append((f"language_model.model.{name}", w))
    theirs.update(tree_unflatten(shared))
    mx.eval(theirs.parameters())


def quantized(path: Path, who: str) -> Path:
    out = OUT / f"{path.name}-{who}-4bit"
    if not out.exists():
        if who == "ours":
            from mlx_qwen35.convert import QuantSpec, convert

            convert(path, out, dtype="bfloat16", quantize_spec=QuantSpec(bits=4))
        else:
            from mlx_lm import convert

            convert(str(path), str(out), quantize=True, q_bits=4, q_group_size=64, dtype="bfloat16")
    return out


def run_ours(model, ids, n):
    """Seconds to the first token and for the ``n`` tokens after it, and the tokens."""
    from mlx_qwen35.engine import decode_tokens, prefill
    from mlx_qwen35.reasoning import ThinkingControl

    control = ThinkingControl(None, reasoning=False, budget=None)
    cache = model.make_cache()
    t0 = time.perf_counter()
    logits = prefill(model, ids, cache)
    tokens = decode_tokens(model, logits, cache, sampler=greedy, processors=[], control=control, max_tokens=n + 1)
    out = [next(tokens)]
    t1 = time.perf_counter()
    out += [next(tokens) for _ in range(n)]
    return t1 - t0, time.perf_counter() - t1, out


def run_theirs(model, ids, n):
    from mlx_lm.generate import generate_step, generation_stream

    tokens = generate_step(mx.array(ids), model, max_tokens=n + 1, sampler=greedy)
    t0 = time.perf_counter()
    out = [next(tokens)[0]]
    t1 = time.perf_counter()
    out += [next(tokens)[0] for _ in range(n)]
    t2 = time.perf_counter()
    tokens.close()  # it queues one step past the last token: let it finish untimed
    mx.synchronize(generation_stream)
    return t1 - t0, t2 - t1, out


RUN = {"ours": run_ours, "mlx-lm": run_theirs}


def measure(models: dict, prompts, decode: int, rounds: int) -> tuple[dict, dict]:
    """{(who, T): (prefill tok/s, decode tok/s, peak GiB)}, best of ``rounds`` alternating rounds,
    and {(who, T): the tokens generated}."""
    for who, model in models.items():
        RUN[who](model, list(range(1000, 1008)), 2)  # warm-up
    best: dict = {}
    tokens: dict = {}
    order = list(models)
    for r in range(rounds):
        for T in prompts:
            ids = list(range(1000, 1000 + T))
            for who in order if r % 2 == 0 else order[::-1]:
                mx.clear_cache()
                mx.reset_peak_memory()
                pre, dec, tokens[who, T] = RUN[who](models[who], ids, decode)
                row = (T / pre, decode / dec, mx.get_peak_memory() / 2**30)
                old = best.get((who, T), (0.0, 0.0, 0.0))
                best[who, T] = tuple(max(a, b) for a, b in zip(old, row))
    return best, tokens


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="fp32-long,fp32,bf16", help=f"comma-separated of {', '.join(SECTIONS)}")
    ap.add_argument("--model", default="qwen3_5_2b", choices=["qwen3_5_2b", "qwen3_5_0_8b"])
    ap.add_argument("--rounds", type=int, help="rounds per section (default: per section, 1-3)")
    a = ap.parse_args()
    blas = use_fast_blas()
    path = default_checkpoint(a.model)
    print(f"checkpoint: {path}  (random weights, real shape)\nmlx {mx.__version__}, device {mx.default_device()}, BLAS: {blas}")
    header = f"{'case':<18}{'':>6}{'ours':>12}{'mlx-lm':>12}{'ratio':>8}"
    for name in a.only.split(","):
        s = SECTIONS[name]
        rounds = a.rounds or s["rounds"]
        ours, theirs = load_pair(path, s["dtype"])
        load = os.getloadavg()[0]
        res, tokens = measure({"ours": ours, "mlx-lm": theirs}, s["prompts"], s["decode"], rounds)
        del ours, theirs
        mx.clear_cache()
        print(
            f"\n[{name}] {s['dtype']}, decode {s['decode']} tokens, best of {rounds} alternating round(s); "
            f"load average {load:.1f} -> {os.getloadavg()[0]:.1f}\n{header}"
        )
        for T in s["prompts"]:
            for i, (label, unit) in enumerate((("prefill", "tok/s"), ("decode", "tok/s"), ("peak mem", "GiB"))):
                o, r = res["ours", T][i], res["mlx-lm", T][i]
                print(f"{label + ' T=' + str(T):<18}{unit:>6}{o:>12.2f}{r:>12.2f}{o / r:>7.2f}x", flush=True)
            same = sum(a == b for a, b in zip(tokens["ours", T], tokens["mlx-lm", T]))
            why = "each side's own 4-bit conversion" if s["dtype"] == "q4" else "same weights"
            print(f"{'same tokens':<18}{'':>6}{same:>12} of {len(tokens['ours', T])} (greedy; {why})")


if __name__ == "__main__":
    main()
