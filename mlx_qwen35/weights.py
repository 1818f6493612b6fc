"""A checkpoint folder: its safetensors read safely, its writer recognised, its tensors checked into a model.

Four layouts reach us: raw Hugging Face checkpoints, folders written by
mlx-lm or mlx-vlm (the ``mlx-community/Qwen3.5-*`` repos), and our own.
:meth:`Checkpoint.build` is the one load pipeline: ``Model.sanitize`` maps
each to our names and layouts, and the tensors are checked against the
model before they are assigned.
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .config import ModelConfig, load_config
from .errors import Qwen35Error
from .model import Model
from .quant import apply_quantization

FORMAT_KEY = "mlx_qwen35"  # marks config.json files we wrote
FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    """A checkpoint folder opened: its config, the writer of its tensors, and the tensors (lazy, not yet read)."""

    folder: Path
    config: ModelConfig
    format: str  # "hf", "ours" or "mlx" (mlx-lm and mlx-vlm)
    tensors: dict[str, mx.array]  # as stored
    files: dict[str, str]  # tensor name → the file that holds it

    @classmethod
    def open(cls, folder: Path) -> "Checkpoint":
        """Parse the config and map every tensor of the folder's safetensors files (headers checked, no data read)."""
        folder = Path(folder)
        config = load_config(folder)
        tensors, files = _read_tensors(folder)
        return cls(folder, config, detect_format(config.raw, tensors), tensors, files)

    @property
    def quant_bits(self) -> Optional[int]:
        """The bits of its quantized layers (the config's default); None when it is not quantized."""
        quant = self.config.quantization
        return None if not quant else quant.get("bits", 4)

    @property
    def dtype(self) -> mx.Dtype:
        """The commonest dtype of its floating tensors."""
        floats = Counter(w.dtype for w in self.tensors.values() if mx.issubdtype(w.dtype, mx.floating))
        return floats.most_common(1)[0][0] if floats else mx.float32

    def build(self, *, vision: bool = True, mtp: bool = True) -> Model:
        """The model with these weights assigned (still lazy); ``vision`` and ``mtp`` build those parts if present."""
        tensors, files = {}, {}
        for name, w in self.tensors.items():
            new, tensors[new] = Model.sanitize(name, w, self.format)
            files[new] = self.files[name]
        has = lambda prefix: any(k.startswith(prefix) for k in tensors)
        model = Model(self.config, vision=vision and has("visual."), mtp=mtp and has("mtp."))
        if self.config.quantization:
            apply_quantization(model, self.config.quantization, tensors)
        _load_into(model, model.held(tensors), files, self.folder)
        return model


def check_safetensors(path: Path) -> list[str]:
    """Validate the header and size of a safetensors file; return its tensor names.

    A truncated or corrupt file gets a clear error here instead of a crash
    (or silently short data) when the tensor is first read.
    """
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100 << 20):
                raise ValueError(f"header length {n} exceeds the file")
            header = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError) as e:
        raise Qwen35Error(f"{path}: not a valid safetensors file ({e})") from None
    end = 0
    names = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, IndexError, ValueError):
            raise Qwen35Error(f"{path}: tensor '{name}' has a malformed header entry") from None
        names.append(name)
    if 8 + n + end > size:
        raise Qwen35Error(
            f"{path}: truncated: its header describes {8 + n + end} bytes but the file has {size}"
        )
    return names


def _read_tensors(folder: Path) -> tuple[dict[str, mx.array], dict[str, str]]:
    """Map every tensor of the folder's safetensors files, lazily; and the file each is in."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise Qwen35Error(f"{index}: not a valid safetensors index ({e})") from None
        files = sorted({folder / f for f in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise Qwen35Error(f"{index}: lists {f.name}, which is missing")
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise Qwen35Error(f"{folder}: no *.safetensors files (only safetensors checkpoints are loaded)")
    tensors, where = {}, {}
    for f in files:
        check_safetensors(f)
        try:
            loaded = mx.load(str(f))
        except Exception as e:  # mlx raises RuntimeError/ValueError with little context
            raise Qwen35Error(f"{f}: could not be read as safetensors ({e})") from None
        for k, v in loaded.items():
            tensors[k] = v
            where[k] = f.name
    return tensors, where


def detect_format(config_raw: dict, names) -> str:
    """Which writer produced these tensors: 'ours', 'hf' or 'mlx' (mlx-lm and mlx-vlm)."""
    if FORMAT_KEY in config_raw:
        version = config_raw[FORMAT_KEY].get("format_version")
        if version != FORMAT_VERSION:
            raise Qwen35Error(
                f"config.json: written by mlx_qwen35 format {version}; this version reads {FORMAT_VERSION}"
            )
        return "ours"
    names = list(names)
    if any(n.startswith("language_model.model.") for n in names):
        return "mlx"
    if any(n.startswith(("model.language_model.", "model.layers.", "model.embed_tokens.")) for n in names):
        return "hf"
    raise Qwen35Error(
        "checkpoint: tensor names match no known Qwen3.5 layout "
        f"(first: {names[:3]}); expected 'model.language_model.*' (Hugging Face) "
        "or 'language_model.model.*' (mlx-lm / mlx-vlm)"
    )


def _load_into(model: nn.Module, got: dict[str, mx.array], files: dict[str, str], folder: Path) -> None:
    """Check names and shapes against the model, then assign (still lazily)."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(got))
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise Qwen35Error(f"{folder}: checkpoint lacks tensor '{missing[0]}'{more}")
    unexpected = sorted(set(got) - set(expected))
    if unexpected:
        k = unexpected[0]
        more = f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""
        raise Qwen35Error(f"{folder}/{files[k]}: unexpected tensor '{k}'{more} for this config")
    for k, w in got.items():
        if tuple(w.shape) != tuple(expected[k].shape):
            raise Qwen35Error(
                f"{folder}/{files[k]}: tensor '{k}' has shape {tuple(w.shape)}, "
                f"expected {tuple(expected[k].shape)} from config.json"
            )
    model.load_weights(list(got.items()), strict=True)
