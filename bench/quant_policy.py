"""What the 4-bit precision policy costs and buys, against quantizing everything at 4 bits.

    python bench/quant_policy.py

size: bytes and bits per weight of the 2B text model (from its config alone)
under mlx-lm's uniform 4-bit (every Linear and the embedding, in_proj_a/b
included) and under our policy (README "Quantization policy").

error: relative logit error against the float model, on a small random
checkpoint built with transformers' own initialisation (a calm network),
for the uniform scheme, our policy, and our policy with one upgrade undone at
a time. Random weights lack the outliers of trained ones, so this shows the
structural effect only; the per-tensor choices also follow the published
KL-divergence sweeps summarised in the README.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from mlx_qwen35.config import parse_config  # noqa: E402
from mlx_qwen35.model import Model  # noqa: E402
from mlx_qwen35.quant import QuantSpec  # noqa: E402
from shapes import QWEN3_5_2B  # noqa: E402



def uniform(path, module):
    return isinstance(module, (nn.Linear, nn.Embedding)) and not path.startswith("visual.")


def quantized_bytes(model, decide) -> tuple[int, int]:
    """(bytes, parameters) of the language model if layers were quantized as ``decide`` says."""
    nbytes = params = 0
    quantized = {}
    for path, m in model.named_modules():
        if path.startswith("language_model") and isinstance(m, (nn.Linear, nn.Embedding)):
            d = decide(path, m)
            if d:
                quantized[path] = d
    for name, w in tree_flatten(model.language_model.parameters()):
        path = "language_model." + name.rsplit(".", 1)[0]
        params += w.size
        if path in quantized and name.endswith("weight"):
            d = quantized[path]
            bits = d["bits"] if isinstance(d, dict) else 4
            gs = d["group_size"] if isinstance(d, dict) else 64
            nbytes += w.size * bits // 8 + 2 * (w.size // gs) * 2  # packed + bf16 scales and biases
        else:
            nbytes += w.size * (4 if Model.keeps_float32(name) else 2)
    return nbytes, params


def sizes():
    model = Model(parse_config(QWEN3_5_2B), vision=False)
    spec = QuantSpec(bits=4)
    print("[size] Qwen3.5-2B language model (tied embedding counted once)")
    for name, decide in (
        ("uniform 4-bit (mlx-lm)", lambda p, m: {"bits": 4, "group_size": 64}),
        ("our policy", lambda p, m: Model.quant_predicate(p, m, spec)),
    ):
        b, n = quantized_bytes(model, decide)
        print(f"  {name:<24} {b / 2**30:6.3f} GiB  {8 * b / n:5.2f} bits/weight")


def errors():
    from checkpoints import TEXT, build_hf_checkpoint

    from mlx_qwen35.loading import load_model

    text = dict(TEXT, hidden_size=128, intermediate_size=256, num_hidden_layers=8,
                layer_types=["linear_attention"] * 3 + ["full_attention"], vocab_size=2048)
    text["layer_types"] = text["layer_types"] * 2
    tmp = Path(tempfile.mkdtemp())
    build_hf_checkpoint(tmp / "hf", text=text, vision=None, hf_init=True, with_mtp=False)
    ids = mx.array(np.random.default_rng(0).integers(0, 2048, (4, 64)))
    ref = np.array(load_model(tmp / "hf", dtype=mx.float32)(ids))
    spec = QuantSpec(bits=4)

    def undo(pattern):
        def decide(path, m):
            d = Model.quant_predicate(path, m, spec)
            return spec.settings() if pattern in path and isinstance(m, (nn.Linear, nn.Embedding)) else d
        return decide

    variants = {
        "uniform 4-bit (mlx-lm)": lambda p, m: uniform(p, m) and m.weight.shape[-1] % 64 == 0,
        "our policy": lambda p, m: Model.quant_predicate(p, m, spec),
        "  … with out_proj 4-bit": undo("linear_attn.out_proj"),
        "  … with attention 4-bit": undo("self_attn."),
        "  … with embedding 4-bit": undo("embed_tokens"),
        "  … with in_proj_a/b 4-bit": lambda p, m: Model.quant_predicate(p, m, spec)
        or (p.endswith(("in_proj_a", "in_proj_b")) and m.weight.shape[-1] % 64 == 0 and spec.settings()),
    }
    print("\n[error] relative logit error against float32, 8-layer random model (hf init)")
    for name, decide in variants.items():
        model = load_model(tmp / "hf", dtype=mx.float32)
        nn.quantize(model, group_size=64, bits=4, class_predicate=decide)
        out = np.array(model(ids))
        err = np.linalg.norm(out - ref) / np.linalg.norm(ref)
        print(f"  {name:<28} {err:.4f}")


if __name__ == "__main__":
    sizes()
    errors()
