"""Which checkpoint ``chat``, ``generate`` and ``info`` run, and at which precision.

``--model`` is a local folder (a raw Hugging Face checkpoint, ours, or one
written by mlx-lm / mlx-vlm) or a hub id. A hub repo that already holds MLX
weights is used as downloaded; a raw checkpoint is downloaded once and
converted once into ``~/.cache/mlx_qwen35/<org>--<name>-<precision>``, which
later runs reuse without touching the network.

The default precision follows the backend: 4-bit on an Apple GPU; float32 on
a CPU, where MLX sends float32 matmuls to BLAS but runs bf16 and quantized
ones on much slower generic kernels.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx

from .convert import DTYPES
from .errors import Qwen35Error
from .loading import load_model, resolve
from .ops.dispatch import on_metal
from .precision import PRECISIONS
from .quant import QuantSpec, quantize
from .weights import Checkpoint

DEFAULT_MODEL = "Qwen/Qwen3.5-2B"
CPU_NOTE = "CPU backend: running in float32, the fastest here (float32 matmuls use BLAS; bf16 and quantized ones do not)"
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def cache_root() -> Path:
    """Where converted hub checkpoints live: ``$XDG_CACHE_HOME/mlx_qwen35`` (default ``~/.cache``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mlx_qwen35"


def concrete_precision(precision: str, *, metal: bool) -> str:
    """``auto`` → 4-bit on an Apple GPU, float32 on a CPU; anything else checked and returned."""
    if precision not in PRECISIONS:
        raise Qwen35Error(f"--precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    return "4bit" if metal else "float32"


@dataclass(frozen=True)
class Plan:
    """What to load and how: the folder, a cast of its floating weights, bits to quantize to in memory."""

    folder: Path
    precision: str
    dtype: Optional[mx.Dtype] = None
    quantize_bits: Optional[int] = None
    notes: tuple[str, ...] = field(default=())
    mtp: Optional[bool] = None  # build the MTP head (None: where drafting pays)


def plan(
    model: Optional[str] = None,
    precision: str = "auto",
    *,
    metal: Optional[bool] = None,
    convert: bool = True,
    say: Callable[[str], None] = lambda _: None,
    progress: Optional[Callable[[int, int, str], None]] = None,
) -> Plan:
    """Decide how to run ``model`` (default :data:`DEFAULT_MODEL`) at ``precision``.

    A raw checkpoint from the hub is converted into :func:`cache_root` (once;
    ``say`` announces it and ``progress`` follows it), unless ``convert`` is
    False: then it is planned like a local raw folder, converted in memory.
    An already quantized checkpoint runs as stored under ``auto``.
    """
    name = model or DEFAULT_MODEL
    metal = on_metal() if metal is None else metal
    p = concrete_precision(precision, metal=metal)
    notes = (CPU_NOTE,) if precision == "auto" and not metal else ()
    hub = not Path(name).expanduser().exists()
    if hub:
        for tag in _cache_tags(p):
            cached = cache_root() / f"{name.replace('/', '--')}-{tag}"
            if (cached / "config.json").is_file():
                return _plan_folder(cached, Checkpoint.open(cached), precision, p, notes)
    folder = resolve(name)  # a hub id that is not cached yet is downloaded here
    ckpt = Checkpoint.open(folder)
    if hub and convert and ckpt.format == "hf":
        folder = _convert_once(name, folder, p, ckpt, say, progress)
        ckpt = Checkpoint.open(folder)
    return _plan_folder(folder, ckpt, precision, p, notes)


def _cache_tags(precision: str) -> tuple[str, ...]:
    if precision == "float32":
        return ("bfloat16", "float16", "float32")  # a lossless copy of the source, cast when loaded
    return (precision,)


def _convert_once(name: str, source: Path, precision: str, ckpt: Checkpoint, say, progress) -> Path:
    from .convert import convert

    if precision in ("4bit", "8bit"):
        dtype, spec, tag = "bfloat16", QuantSpec(bits=int(precision[0])), precision
    else:
        # float32 runs from the source's own precision (bf16 for the official checkpoints: half the disk)
        dtype = "bfloat16" if precision == "bfloat16" else DTYPE_NAMES.get(ckpt.dtype, "float32")
        spec, tag = None, dtype
    out = cache_root() / f"{name.replace('/', '--')}-{tag}"
    say(f"converting {name} to {tag} into {out} (once; later runs reuse it)")
    convert(source, out, dtype=dtype, quantize_spec=spec, force=True, progress=progress)
    return out


def _plan_folder(folder: Path, ckpt: Checkpoint, requested: str, precision: str, notes: tuple[str, ...]) -> Plan:
    cast = {"float32": mx.float32, "bfloat16": mx.bfloat16}.get(precision)
    if ckpt.quant_bits is None:
        bits = int(precision[0]) if precision in ("4bit", "8bit") else None
        return Plan(folder, precision, cast, bits, notes)
    if requested == "auto" and precision in ("4bit", "8bit"):
        return Plan(folder, f"{ckpt.quant_bits}bit", None, None, notes)
    if precision in ("4bit", "8bit") and int(precision[0]) != ckpt.quant_bits:
        raise Qwen35Error(
            f"--precision {precision}: {folder} is already quantized to {ckpt.quant_bits} bits; "
            "use --precision auto, or a checkpoint that is not quantized"
        )
    if cast is not None:
        notes += (f"{folder.name} is quantized: its quantized layers stay so, the rest run in {precision}",)
    return Plan(folder, precision, cast, None, notes)


def build(p: Plan, *, lazy: bool = False):
    """The model of a :class:`Plan`; ``lazy`` reads no weights (shapes and dtypes only)."""
    model = load_model(p.folder, dtype=p.dtype, mtp=p.mtp, lazy=True)
    if p.quantize_bits is not None:
        quantize(model, QuantSpec(bits=p.quantize_bits))
    if not lazy:
        mx.eval(model.language_model.parameters(), model.mtp.parameters() if model.has_mtp else [])
    return model


def load_plan(p: Plan, chat_template: Optional[str] = None):
    """``(model, tokenizer)`` of a :class:`Plan`; ``chat_template`` replaces the checkpoint's."""
    from .tokenizer import load_tokenizer

    return build(p), load_tokenizer(p.folder, chat_template)


__all__ = [
    "DEFAULT_MODEL",
    "PRECISIONS",
    "Plan",
    "build",
    "cache_root",
    "load_plan",
    "plan",
]
