"""From a folder or hub id to a ready model (and tokenizer)."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx
from mlx.utils import tree_flatten

from .config import ModelConfig
from .errors import Qwen35Error
from .model import Model
from .ops import prepare
from .ops.dispatch import drafting_pays, widens_bf16
from .weights import Checkpoint

# What a checkpoint needs besides its weights; nothing executable.
CHECKPOINT_FILES = [
    "*.json",
    "*.safetensors",
    "*.jinja",
    "*.txt",
    "*.model",
    "*.tiktoken",
]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve(path_or_id: Union[str, Path]) -> Path:
    """A local folder as is; a hub id fetched (or found in the hub cache)."""
    p = Path(path_or_id).expanduser()
    if p.exists():
        if not p.is_dir():
            raise Qwen35Error(f"{p}: not a folder (expected a checkpoint folder with config.json)")
        return p
    s = str(path_or_id)
    if not _HUB_ID.match(s):
        raise Qwen35Error(f"{s}: no such folder, and not a Hugging Face repo id like 'Qwen/Qwen3.5-2B'")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(s, allow_patterns=CHECKPOINT_FILES))
    except Exception as e:  # offline, unknown repo, gated repo, interrupted download
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise Qwen35Error(
            f"{s}: could not fetch from the Hugging Face hub ({reason}); "
            "check the id and your connection, or pass a local folder"
        ) from None


def load_model(
    path_or_id: Union[str, Path],
    *,
    dtype: Optional[mx.Dtype] = None,
    vision: bool = True,
    mtp: Optional[bool] = None,
    lazy: bool = False,
) -> Model:
    """Build the model from any supported checkpoint layout.

    Weights stay lazy until used; only the language model is evaluated here,
    so the vision tower costs no memory until an image arrives. ``dtype``
    casts floating weights (quantized ones stay quantized). ``lazy`` skips
    that evaluation: nothing is read, yet every array's shape and dtype (so
    the bytes it will take) are known. ``mtp`` builds the multi-token-prediction
    head when the checkpoint has one (None: where drafting with it pays, an Apple GPU).
    """
    if mtp is None:
        mtp = drafting_pays()
    model = Checkpoint.open(resolve(path_or_id)).build(vision=vision, mtp=mtp)
    if dtype is not None:
        model.cast(dtype, keep=half_projection if dtype == mx.float32 and widens_bf16() else None)
    text = [model.language_model] + ([model.mtp] if model.has_mtp else [])
    for part in text:
        prepare(part)  # float32-BLAS projections where the CPU paths apply
    model.language_model.dtype = dtype if dtype is not None else run_dtype(model)
    if not lazy:
        mx.eval([part.parameters() for part in text])
    return model


def half_projection(name: str, w: mx.array) -> bool:
    """A bfloat16 text projection or embedding, which a float32 run on the CPU leaves in bfloat16.

    The CPU route widens such weights to float32 as it reads them (exactly:
    bf16 is float32 with the low bits zero), so the numbers are a float32
    run's, for half the bytes read a token and half the memory.
    """
    return w.dtype == mx.bfloat16 and w.ndim == 2 and name.endswith(".weight") and not name.startswith("visual.")


def run_dtype(model: Model) -> mx.Dtype:
    """The dtype activations run in: the commonest among text weights neither quantized nor kept in float32."""
    floats = [
        w.dtype
        for name, w in tree_flatten(model.language_model.parameters())
        if mx.issubdtype(w.dtype, mx.floating) and not model.keeps_float32(name) and not name.endswith((".scales", ".biases"))
    ]
    return Counter(floats).most_common(1)[0][0] if floats else mx.float32


def load(path_or_id: Union[str, Path], *, dtype: Optional[mx.Dtype] = None, mtp: Optional[bool] = None):
    """Load ``(model, tokenizer)`` from a local folder or a hub id.

    Accepts our converted folders, raw Hugging Face checkpoints (converted in
    memory), and folders converted by mlx-lm or mlx-vlm. ``mtp``: as :func:`load_model`.
    """
    from .tokenizer import load_tokenizer

    folder = resolve(path_or_id)
    return load_model(folder, dtype=dtype, mtp=mtp), load_tokenizer(folder)


__all__ = ["load", "load_model", "resolve", "run_dtype", "ModelConfig"]
