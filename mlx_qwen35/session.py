"""Saved sessions: a chat's messages, settings, media features and whole cache in one safetensors file.

The file holds the cache and its snapshots through the cache protocol
(``state`` and ``meta_state``, see :mod:`mlx_qwen35.model.cache`): layer ``i``'s
arrays are ``cache.{i}.{name}``, snapshot ``j``'s ``snap.{j}.{i}.{name}``, and
the layers' meta states are the ``kv_offsets``. The metadata carries a format
version, a fingerprint of the model and a checksum of everything; the file is
written atomically. Tools are saved as their schemas: Python functions are
bound again by name when the session is loaded with them.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections import defaultdict
from dataclasses import fields
from pathlib import Path
from typing import Union

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .errors import Qwen35Error
from .media import Media
from .sampling import Sampling
from .tools import tool_schemas
from .turn import Settings
from .weights import check_safetensors

SESSION_FORMAT = "mlx_qwen35.session"
SESSION_VERSION = 3  # 2: the model fingerprint samples every text weight; 3: tools and the reply tokens


def model_identity(model, samples: int = 1024) -> str:
    """A fingerprint of the model's architecture and text weights (not of their runtime precision).

    Two models' weights differ nearly everywhere (a fine-tune, another quantization), so a strided
    sample of every tensor (``samples`` values each) tells them apart at a small fraction of the
    cost of hashing them all.
    The vision tower is left out: it loads only when an image arrives.
    """
    h = hashlib.sha256(repr(model.config.text).encode())
    weights = tree_flatten(model.language_model.parameters())
    picked = []
    for _, w in weights:
        s = w.reshape(-1)[:: max(1, w.size // samples)]
        picked.append(s.astype(mx.float32) if mx.issubdtype(s.dtype, mx.floating) else s)
    mx.eval(picked)
    for (name, w), s in zip(weights, picked):
        h.update(f"{name}{tuple(w.shape)}".encode())
        h.update(_bytes(s))
    return h.hexdigest()[:32]


def save(chat, path: Union[str, Path]) -> Path:
    """Write ``chat``'s conversation, settings and full cache to ``path``, atomically."""
    path = Path(path)
    arrays = _layer_arrays("cache", [c.state for c in chat.cache])
    for j, (_, snap) in enumerate(chat.snapshots):
        arrays.update(_layer_arrays(f"snap.{j}", snap))
    for j, m in enumerate(chat.media):
        arrays[f"media.{j}"] = m.encode(chat.model)
    settings = {f.name: getattr(chat, f.name) for f in fields(Settings)}
    settings["sampling"] = None if chat.sampling is None else vars(chat.sampling)
    settings["tools"] = tool_schemas(chat.tools) or None
    meta = {
        "format": SESSION_FORMAT,
        "version": SESSION_VERSION,
        "model": model_identity(chat.model),
        "messages": chat.messages,
        "settings": settings,
        "tokens": chat.tokens,
        "reply_tokens": chat.reply_tokens,
        "snapshots": [n for n, _ in chat.snapshots],
        "media": [{"kind": m.kind, "grid": m.grid.tolist(), "timestamps": m.timestamps} for m in chat.media],
        "kv_offsets": [c.meta_state for c in chat.cache],
    }
    mx.eval(list(arrays.values()))
    meta["digest"] = _digest(meta, arrays)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".safetensors")
        os.close(fd)
    except OSError as e:
        raise Qwen35Error(f"{path}: cannot save here ({e.strerror})") from None
    try:
        # the name ends in .safetensors, or MLX would append it
        mx.save_safetensors(tmp, arrays, metadata={"session": json.dumps(meta)})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load(cls, path: Union[str, Path], model, tokenizer, tools=None):
    """A ``cls`` (a :class:`~mlx_qwen35.chat.Chat`) resumed from ``path`` with ``model``, exactly where it stopped.

    ``tools``: Python functions that replace the saved tool schemas of the same name.
    """
    path = Path(path)
    meta, arrays = _read_session(path)
    if meta.get("format") != SESSION_FORMAT:
        raise Qwen35Error(f"{path}: not an mlx_qwen35 session file")
    if meta.get("version") not in (2, SESSION_VERSION):
        raise Qwen35Error(
            f"{path}: session format version {meta.get('version')}; this mlx_qwen35 reads 2 and {SESSION_VERSION}"
        )
    digest = meta.pop("digest", None)
    if digest != _digest(meta, arrays):
        raise Qwen35Error(f"{path}: damaged or modified (its checksum does not match)")
    if meta["version"] == 2 and isinstance(meta.get("settings"), dict):  # before tools: none, and no reply kept
        meta = {**meta, "reply_tokens": [], "settings": {**meta["settings"], "tools": None}}
    if isinstance(meta.get("settings"), dict):  # saved before MTP drafting: its defaults
        meta["settings"] = {"mtp": None, "num_draft_tokens": Settings.num_draft_tokens, "draft_vocab": None,
                            **meta["settings"]}
    n_layers = len(model.make_cache())  # without the MTP head's layer, which a file may hold or not
    saved = len(meta.get("kv_offsets") or ())
    _check_meta(path, meta, saved if saved in (n_layers, n_layers + 1) else n_layers)
    if meta["model"] != model_identity(model):
        raise Qwen35Error(f"{path}: saved with a different model; load it with the model it was saved with")
    settings = dict(meta["settings"])
    settings["sampling"] = None if settings["sampling"] is None else Sampling(**settings["sampling"])
    settings["tools"] = _bind(settings["tools"], tools)
    chat = cls(model, tokenizer, **settings)
    chat.cache = chat.cache[:saved]  # saved without the head's layer: this conversation decodes plainly
    chat.messages = meta["messages"]
    chat.tokens, chat.reply_tokens = meta["tokens"], meta["reply_tokens"]
    layers = _by_layer(arrays)
    try:
        chat.media = [
            Media(m["kind"], np.array(m["grid"]), timestamps=m["timestamps"], features=arrays[f"media.{j}"])
            for j, m in enumerate(meta["media"])
        ]
        for i, (c, m) in enumerate(zip(chat.cache, meta["kv_offsets"])):
            c.meta_state, c.state = m, layers["cache"][i]
            if c.meta_state != m:
                raise Qwen35Error(f"{path}: layer {i}'s cache does not match 'kv_offsets' (damaged)")
    except KeyError as e:
        raise Qwen35Error(f"{path}: lacks tensor {e} (damaged, or not written by Chat.save)") from None
    chat.snapshots = [
        (n, [layers[f"snap.{j}"][i] for i in range(len(chat.cache))]) for j, n in enumerate(meta["snapshots"])
    ]
    return chat


def _bind(saved, functions):
    """The saved tool schemas, each replaced by the function of ``functions`` with its name."""
    if not functions:
        return saved
    names = [s["function"]["name"] for s in saved or ()]
    given = dict(zip((s["function"]["name"] for s in tool_schemas(functions)), functions))
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise Qwen35Error(f"tools: {unknown[0]!r} is not one of the session's tools ({', '.join(names) or 'none'})")
    return [given.get(name, schema) for name, schema in zip(names, saved)]


def _layer_arrays(prefix: str, states: list[dict]) -> dict[str, mx.array]:
    """Per-layer states (dicts of arrays) as one flat dict: ``{prefix}.{layer}.{name}``."""
    return {f"{prefix}.{i}.{name}": a for i, state in enumerate(states) for name, a in state.items()}


def _by_layer(arrays: dict[str, mx.array]) -> dict[str, dict[int, dict[str, mx.array]]]:
    """:func:`_layer_arrays` undone for every prefix at once: prefix → layer → state (``{}`` if none)."""
    out = defaultdict(lambda: defaultdict(dict))
    for key, a in arrays.items():
        head, name = key.rsplit(".", 1)
        prefix, _, layer = head.rpartition(".")
        if layer.isdecimal():
            out[prefix][int(layer)][name] = a
    return out


_NUMBER, _INTS = (int, float), (int, type(None))
# What load reads from the metadata: key → (types, what is expected); lists give their items' types.
_META = {
    "model": (str, "text"),
    "messages": ([dict], "a list of messages"),
    "settings": (dict, "an object"),
    "tokens": ([int], "a list of token ids"),
    "reply_tokens": ([int], "a list of token ids"),
    "snapshots": ([int], "a list of token offsets"),
    "media": ([dict], "a list of objects"),
    "kv_offsets": ([_INTS], "a list of offsets (or null)"),
}
_SETTINGS = {f.name: f.metadata["json"] for f in fields(Settings)}
_MEDIA = {
    "kind": (str, "image or video"),
    "grid": ([list], "a list of [t, h, w]"),
    "timestamps": ((list, type(None)), "a list of seconds or null"),
}


def _check_meta(path: Path, meta: dict, layers: int) -> None:
    """Every key load reads, with its type: a malformed session is one line naming the key, not a KeyError."""

    def is_a(value, kinds) -> bool:
        # True is an int too
        kinds_ = kinds if isinstance(kinds, tuple) else (kinds,)
        return isinstance(value, kinds) and (not isinstance(value, bool) or bool in kinds_)

    def check(where: str, d: dict, schema: dict) -> None:
        for key, (kinds, expected) in schema.items():
            name = f"{where}{key}"
            if key not in d:
                raise Qwen35Error(f"{path}: session metadata lacks '{name}'")
            value = d[key]
            if isinstance(kinds, list):
                ok = isinstance(value, list) and all(is_a(v, kinds[0]) for v in value)
            else:
                ok = is_a(value, kinds)
            if not ok:
                raise Qwen35Error(f"{path}: session metadata '{name}' must be {expected}, got {json.dumps(value)[:60]}")

    check("", meta, _META)
    check("settings.", meta["settings"], _SETTINGS)
    sampling = meta["settings"]["sampling"]
    if sampling is not None:
        names = [f.name for f in fields(Sampling)]
        unknown = sorted(set(sampling) - set(names))
        if unknown:
            raise Qwen35Error(f"{path}: session metadata 'settings.sampling' has an unknown key '{unknown[0]}'")
        check("settings.sampling.", sampling, {name: (_NUMBER, "a number") for name in names})
        try:
            Sampling(**sampling)
        except Qwen35Error as e:
            raise Qwen35Error(f"{path}: session metadata 'settings.sampling': {e}") from None
    try:
        tool_schemas(meta["settings"]["tools"])
    except Qwen35Error as e:
        raise Qwen35Error(f"{path}: session metadata 'settings.tools': {e}") from None
    for j, m in enumerate(meta["media"]):
        check(f"media.{j}.", m, _MEDIA)
    for j, m in enumerate(meta["messages"]):
        check(f"messages.{j}.", m, {"role": (str, "a role")})
    if len(meta["kv_offsets"]) != layers:
        raise Qwen35Error(f"{path}: session metadata 'kv_offsets' has {len(meta['kv_offsets'])} layers, not {layers}")


def _digest(meta: dict, arrays: dict[str, mx.array]) -> str:
    h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for name in sorted(arrays):
        h.update(name.encode())
        h.update(_bytes(arrays[name]))
    return h.hexdigest()


def _bytes(a: mx.array) -> memoryview:
    # The buffer protocol has no bfloat16; hash its bits instead.
    return memoryview(mx.contiguous(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a))


def _read_session(path: Path) -> tuple[dict, dict[str, mx.array]]:
    if not path.is_file():
        raise Qwen35Error(f"{path}: no such session file")
    check_safetensors(path)
    try:
        arrays, metadata = mx.load(str(path), format="safetensors", return_metadata=True)
        meta = json.loads(metadata["session"])
    except (KeyError, ValueError, RuntimeError) as e:
        raise Qwen35Error(f"{path}: not an mlx_qwen35 session file ({e})") from None
    if not isinstance(meta, dict):
        raise Qwen35Error(f"{path}: not an mlx_qwen35 session file (its metadata is not an object)")
    return meta, arrays
