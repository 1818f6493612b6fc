"""Hugging Face checkpoint → MLX safetensors, at a chosen precision.

The checkpoint is read, mapped and checked by the loader's own pipeline
(``Checkpoint.build``); this module only writes. The output folder holds
sharded safetensors with an index, a ``config.json`` carrying the
quantization settings, and the checkpoint's tokenizer, chat template and
preprocessor files. The vision tower and MTP head are kept, so later
features need no re-conversion. The folder appears only when complete:
everything is written to a temporary sibling folder, then renamed. That
folder is removed if the conversion fails or is stopped (Ctrl-C, SIGTERM,
SIGHUP); one left by a killed process is removed by the next conversion to
the same place.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx
from mlx.utils import tree_flatten

from . import precision
from .errors import Qwen35Error
from .loading import resolve
from .quant import QuantSpec, quantize
from .weights import FORMAT_KEY, FORMAT_VERSION, Checkpoint

DTYPES = {name: getattr(mx, name) for name in precision.DTYPES}

# Copied verbatim from the source checkpoint; never code.
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "generation_config.json",
)

SHARD_BYTES = 4 << 30


def _side_files(src: Path, dst: Path) -> None:
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def _write_shards(weights: dict[str, mx.array], out: Path, progress) -> int:
    """Evaluate tensor by tensor into ≤ 4 GiB shards; returns total bytes."""
    shards: list[dict[str, mx.array]] = [{}]
    size, total = 0, 0
    for i, (name, w) in enumerate(weights.items(), 1):
        mx.eval(w)
        if size and size + w.nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = w
        size += w.nbytes
        total += w.nbytes
        progress(i, len(weights), name)
    weight_map = {}
    n = len(shards)
    for i, shard in enumerate(shards, 1):
        fname = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
        mx.save_safetensors(str(out / fname), shard, metadata={"format": "mlx"})
        weight_map.update({k: fname for k in shard})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return total


@contextmanager
def _signals_exit():
    """SIGTERM and SIGHUP raise SystemExit meanwhile, so cleanup runs (by default they kill at once)."""
    names = ("SIGTERM", "SIGHUP")
    signals = [getattr(signal, n) for n in names if hasattr(signal, n)]
    if threading.current_thread() is not threading.main_thread():
        signals = []  # only the main thread may set handlers
    # a handler someone else set (or an ignored signal, under nohup) stays theirs
    signals = [n for n in signals if signal.getsignal(n) is signal.SIG_DFL]

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    for n in signals:
        signal.signal(n, handler)
    try:
        yield
    finally:
        for n in signals:
            signal.signal(n, signal.SIG_DFL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def _remove_stale(out: Path) -> None:
    """Remove the temporary folders that killed conversions to ``out`` left (their names carry the writer's pid)."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(tmp|old)-(\d+)-.*")
    if not out.parent.is_dir():
        return
    for p in out.parent.iterdir():
        m = pattern.fullmatch(p.name)
        if m and p.is_dir() and not _alive(int(m[2])):
            shutil.rmtree(p, ignore_errors=True)


def _ours(folder: Path) -> bool:
    """Whether ``folder`` was written by this converter (its config.json carries our marker)."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and FORMAT_KEY in config


@dataclass
class Summary:
    path: Path
    total_bytes: int
    parts: dict[str, tuple[int, int]]  # part → (bytes, parameters)

    def bits_per_weight(self, part: str) -> float:
        b, n = self.parts[part]
        return 8 * b / max(n, 1)


def _summarize(path: Path, weights: dict[str, mx.array], params: dict[str, int], total: int) -> Summary:
    parts: dict[str, list[int]] = {}
    for name, w in weights.items():
        part = name.split(".", 1)[0]
        parts.setdefault(part, [0, 0])[0] += w.nbytes
    for name, n in params.items():
        parts.setdefault(name.split(".", 1)[0], [0, 0])[1] += n
    return Summary(path, total, {k: (v[0], v[1]) for k, v in parts.items()})


def convert(
    hf_path: Union[str, Path],
    mlx_path: Union[str, Path],
    *,
    dtype: str = "bfloat16",
    quantize_spec: Optional[QuantSpec] = None,
    force: bool = False,
    progress=None,
) -> Summary:
    """Convert a Hugging Face Qwen3.5 checkpoint (folder or hub id) into ``mlx_path``.

    ``quantize_spec`` None keeps every weight at ``dtype``. ``progress`` is
    called with (done, total, tensor name) as tensors are written.
    """
    if dtype not in DTYPES:
        raise Qwen35Error(f"--dtype: {dtype!r} is not one of {tuple(DTYPES)}")
    out = Path(mlx_path).expanduser().absolute()
    if out.exists() and not force:
        raise Qwen35Error(f"{out}: already exists; pass --force to replace it")

    src = resolve(hf_path)
    if out.exists():  # --force deletes it: only one of our conversions or an empty folder, never the user's files
        if out.resolve() == src.resolve() or out.resolve() in src.resolve().parents:
            raise Qwen35Error(
                f"--mlx-path {out}: contains the checkpoint being converted ({src}); choose another folder"
            )
        if not (out.is_dir() and not any(out.iterdir())) and not _ours(out):
            raise Qwen35Error(
                f"--mlx-path {out}: not a conversion written by mlx_qwen35 (no '{FORMAT_KEY}' in its config.json); "
                "--force replaces only those or an empty folder: choose another --mlx-path"
            )
    _remove_stale(out)
    ckpt = Checkpoint.open(src)
    if ckpt.format != "hf":
        raise Qwen35Error(
            f"{src}: already an MLX conversion ({'ours' if ckpt.format == 'ours' else 'mlx-lm/mlx-vlm'}); "
            "convert from the original Hugging Face checkpoint"
        )
    model = ckpt.build()
    params = {k: w.size for k, w in tree_flatten(model.parameters())}
    model.cast(DTYPES[dtype])
    raw = {k: v for k, v in ckpt.config.raw.items() if k not in ("quantization", "quantization_config")}
    raw[FORMAT_KEY] = {"format_version": FORMAT_VERSION, "dtype": dtype}
    if quantize_spec is not None:
        q = quantize(model, quantize_spec)
        raw["quantization"] = q
        raw["quantization_config"] = q
    weights = dict(tree_flatten(model.parameters()))

    with _signals_exit():
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-{os.getpid()}-"))
            umask = os.umask(0)
            os.umask(umask)
            tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result should not be
        except OSError as e:
            raise Qwen35Error(f"{out.parent}: cannot write here ({e.strerror})") from None
        try:
            total = _write_shards(weights, tmp, progress or (lambda *_: None))
            (tmp / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
            _side_files(src, tmp)
            if out.exists():
                old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-{os.getpid()}-"))
                os.replace(out, old / out.name)
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return _summarize(out, weights, params, total)

