"""Whole-model speed and memory: ours against mlx-lm, side by side, from one run.

Both load the same random-weight checkpoint at the real 2B shape. Prefill is
timed to the first token's logits, decode per token after it, peak memory is
MLX's. On Linux the script re-runs itself on OpenBLAS when it is installed
(see the README):

    python bench/model.py
    ... --only q4     # the slow 4-bit case alone (minutes on a CPU)

Sections: fp32-long (float32, 512 and 2048-token prompts), fp32 and bf16
(128-token prompt), q4 (4-bit, 16-token prompt, 4 decode tokens).
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
from random_checkpoint import OUT, default_checkpoint  # noqa: E402

SECTIONS = {
    "fp32-long": dict(dtype="float32", prompts=(512, 2048), decode=8),
    "fp32": dict(dtype="float32", prompts=(128,), decode=16),
    "bf16": dict(dtype="bfloat16", prompts=(128,), decode=4),
    "q4": dict(dtype="q4", prompts=(16,), decode=4),
}


def greedy(logprobs):
    return mx.argmax(logprobs, axis=-1)


def ours(path: Path, dtype: str):
    from mlx_qwen35.loading import load_model

    if dtype == "q4":
        return load_model(quantized(path, "ours"))
    return load_model(path, dtype=getattr(mx, dtype))


def theirs(path: Path, dtype: str):
    from mlx_lm.utils import load_model

    if dtype == "q4":
        model, _ = load_model(quantized(path, "mlx_lm"))
        return model
    model, _ = load_model(path)
    model.set_dtype(getattr(mx, dtype))
    return model


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
    from mlx_qwen35.generate import ThinkingControl, decode_tokens, prefill

    cache = model.make_cache()
    t0 = time.perf_counter()
    logits = prefill(model, ids, cache)
    mx.eval(logits)
    t1 = time.perf_counter()
    control = ThinkingControl(None, reasoning=False, budget=None)
    for _ in decode_tokens(model, logits, cache, sampler=greedy, processors=[], control=control, max_tokens=n):
        pass
    return t1 - t0, time.perf_counter() - t1


def run_theirs(model, ids, n):
    from mlx_lm.generate import generate_step

    steps = generate_step(mx.array(ids), model, max_tokens=n + 1, sampler=greedy)
    t0 = time.perf_counter()
    next(steps)
    t1 = time.perf_counter()
    for _ in steps:
        pass
    return t1 - t0, time.perf_counter() - t1


def measure(who, load, path, dtype, prompts, decode):
    model = load(path, dtype)
    rows = {}
    for T in prompts:
        ids = list(range(1000, 1000 + T))
        (run_ours if who == "ours" else run_theirs)(model, ids[:8], 2)  # warm-up
        mx.reset_peak_memory()
        pre, dec = (run_ours if who == "ours" else run_theirs)(model, ids, decode)
        rows[T] = (T / pre, decode / dec, mx.get_peak_memory() / 2**30)
    del model
    gc.collect()
    mx.clear_cache()
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="fp32-long,fp32,bf16", help=f"comma-separated of {', '.join(SECTIONS)}")
    ap.add_argument("--model", default="qwen3_5_2b", choices=["qwen3_5_2b", "qwen3_5_0_8b"])
    a = ap.parse_args()
    blas = use_fast_blas()
    path = default_checkpoint(a.model)
    print(f"checkpoint: {path}  (random weights, real shape)\nmlx {mx.__version__}, device {mx.default_device()}, BLAS: {blas}")
    header = f"{'case':<18}{'':>6}{'ours':>12}{'mlx-lm':>12}{'ratio':>8}"
    for name in a.only.split(","):
        s = SECTIONS[name]
        mine = measure("ours", ours, path, s["dtype"], s["prompts"], s["decode"])
        ref = measure("mlx-lm", theirs, path, s["dtype"], s["prompts"], s["decode"])
        print(f"\n[{name}] {s['dtype']}, decode {s['decode']} tokens\n{header}")
        for T in s["prompts"]:
            for i, (label, unit) in enumerate((("prefill", "tok/s"), ("decode", "tok/s"), ("peak mem", "GiB"))):
                o, r = mine[T][i], ref[T][i]
                print(f"{label + ' T=' + str(T):<18}{unit:>6}{o:>12.2f}{r:>12.2f}{o / r:>7.2f}x")


if __name__ == "__main__":
    main()
