"""Checkpoint tensors: reading safetensors safely and naming them our way.

Four layouts reach us: raw Hugging Face checkpoints, folders written by
mlx-lm or mlx-vlm (the ``mlx-community/Qwen3.5-*`` repos), and our own. All
are mapped to one naming (``language_model.*``, ``visual.*``, ``mtp.*``) and
one set of layouts before they meet the model.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map_with_path

from .errors import Qwen35Error

FORMAT_KEY = "mlx_qwen35"  # marks config.json files we wrote
FORMAT_VERSION = 1

# Zero-centred RMSNorms (x̂·(1+w)) whose HF weight gets the +1 folded in.
# linear_attn.norm and the vision LayerNorms are plain and keep their weight.
_SHIFTED_NORMS = (
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "q_norm.weight",
    "k_norm.weight",
    "pre_fc_norm_embedding.weight",
    "pre_fc_norm_hidden.weight",
)


def is_shifted_norm(name: str) -> bool:
    return name.endswith(_SHIFTED_NORMS) or name in ("language_model.norm.weight", "mtp.norm.weight")


def keeps_float32(name: str) -> bool:
    """Small tensors whose precision matters more than their size: A_log and text RMSNorm weights."""
    return name.endswith("A_log") or (not name.startswith("visual.") and name.endswith("norm.weight"))


def cast(model: nn.Module, dtype: mx.Dtype) -> None:
    """Cast floating parameters to ``dtype``; those of :func:`keeps_float32` to float32."""

    def f(name, w):
        if not mx.issubdtype(w.dtype, mx.floating):
            return w
        return w.astype(mx.float32 if keeps_float32(name) else dtype)

    model.update(tree_map_with_path(f, model.parameters()))


@dataclass
class Checkpoint:
    """A folder's tensors (lazy, not yet read) with the file each came from."""

    tensors: dict[str, mx.array]
    files: dict[str, str]


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


def read_checkpoint(folder: Path) -> Checkpoint:
    """Map every tensor of the folder's safetensors files, lazily."""
    folder = Path(folder)
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
    return Checkpoint(tensors, where)


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


def _rename(name: str, fmt: str) -> str:
    if fmt == "hf":
        for old, new in (
            ("model.language_model.", "language_model."),
            ("model.visual.", "visual."),
            ("model.", "language_model."),  # flat qwen3_5_text checkpoints
            ("lm_head.", "language_model.lm_head."),
        ):
            if name.startswith(old):
                return new + name[len(old) :]
    elif fmt == "mlx":
        for old, new in (
            ("language_model.model.", "language_model."),
            ("vision_tower.", "visual."),
        ):
            if name.startswith(old):
                return new + name[len(old) :]
    return name


def to_ours(ckpt: Checkpoint, fmt: str) -> Checkpoint:
    """Rename to our parameter names and apply the layout changes of ``fmt``.

    From Hugging Face: conv1d [C,1,K] → [C,K,1]; the Conv3d patch embed
    [O,C,T,P,P] → a Linear [O, C·T·P·P]; zero-centred norms get their +1,
    added in float32 and kept there. From mlx-vlm: its channels-last patch
    embed [O,T,P,P,C] → [O, C·T·P·P].
    """
    tensors, files = {}, {}
    for name, w in ckpt.tensors.items():
        new = _rename(name, fmt)
        if fmt == "hf":
            if new.endswith("conv1d.weight") and w.ndim == 3:
                w = w.moveaxis(2, 1)
            elif new == "visual.patch_embed.proj.weight" and w.ndim == 5:
                w = w.reshape(w.shape[0], -1)
            elif is_shifted_norm(new):
                w = w.astype(mx.float32) + 1.0
        elif fmt == "mlx" and new == "visual.patch_embed.proj.weight" and w.ndim == 5:
            w = w.transpose(0, 4, 1, 2, 3).reshape(w.shape[0], -1)
        tensors[new] = w
        files[new] = ckpt.files[name]
    return Checkpoint(tensors, files)


def drop_unused(ckpt: Checkpoint, model: nn.Module) -> Checkpoint:
    """Leave out what the model does not hold: a tied head, MTP or vision when not built."""
    own = {k for k, _ in tree_flatten(model.parameters())}
    prefixes = []
    if not hasattr(model, "mtp"):
        prefixes.append("mtp.")
    if not hasattr(model, "visual"):
        prefixes.append("visual.")
    if model.config.text.tie_word_embeddings:
        prefixes.append("language_model.lm_head.")
    keep = {
        k: v
        for k, v in ckpt.tensors.items()
        if k in own or not k.startswith(tuple(prefixes))
    }
    return Checkpoint(keep, {k: ckpt.files[k] for k in keep})


def apply_quantization(model: nn.Module, quant: dict, names) -> None:
    """Swap in quantized layers where the checkpoint holds ``.scales`` for them.

    ``quant`` is mlx-lm's config entry: defaults plus per-layer overrides
    (a dict of settings, or False for a layer left unquantized).
    """
    names = set(names)
    defaults = {
        "group_size": quant.get("group_size", 64),
        "bits": quant.get("bits", 4),
        "mode": quant.get("mode", "affine"),
    }

    def predicate(path, module):
        if f"{path}.scales" not in names:
            return False
        override = quant.get(path)
        if override is False:
            return False
        return {**defaults, **override} if isinstance(override, dict) else dict(defaults)

    nn.quantize(model, class_predicate=predicate)


def load_into(model: nn.Module, ckpt: Checkpoint, folder: Path) -> None:
    """Check names and shapes against the model, then assign (still lazily)."""
    expected = dict(tree_flatten(model.parameters()))
    got = ckpt.tensors
    missing = sorted(set(expected) - set(got))
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise Qwen35Error(f"{folder}: checkpoint lacks tensor '{missing[0]}'{more}")
    unexpected = sorted(set(got) - set(expected))
    if unexpected:
        k = unexpected[0]
        more = f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""
        raise Qwen35Error(f"{folder}/{ckpt.files[k]}: unexpected tensor '{k}'{more} for this config")
    for k, w in got.items():
        if tuple(w.shape) != tuple(expected[k].shape):
            raise Qwen35Error(
                f"{folder}/{ckpt.files[k]}: tensor '{k}' has shape {tuple(w.shape)}, "
                f"expected {tuple(expected[k].shape)} from config.json"
            )
    model.load_weights(list(got.items()), strict=True)
