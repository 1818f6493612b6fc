"""Multi-turn conversations that pay only for their new tokens, and saved sessions.

Each turn re-renders the whole conversation with the checkpoint's template
(which drops past reasoning), so the new prompt is usually not a
continuation of what the cache holds. The cache is therefore snapshotted at
every message boundary (and every ``SNAPSHOT_EVERY`` tokens of long prompts);
a turn restores the latest snapshot inside the prefix it shares with the
previous prompt and prefills only from there.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Sequence, Union

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.cache import ArraysCache

from .engine import Generation, GenerationResult, run
from .errors import Qwen35Error
from .media import Media
from .model import cache as hybrid
from .processor import ImageSource
from .sampling import Sampling
from .tokenizer import special_tokens
from .turn import Settings, Turn, VideoSource, prepare
from .weights import check_safetensors

SNAPSHOT_EVERY = 4096
MAX_SNAPSHOTS = 16
SESSION_FORMAT = "mlx_qwen35.session"
SESSION_VERSION = 2  # 2: the model fingerprint samples every text weight


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


@dataclass(eq=False)
class Chat(Settings):
    """A conversation with the model that keeps its cache across turns.

    ``send`` streams a reply (iterate it for pieces); ``ask`` returns the
    finished :class:`GenerationResult`. The :class:`~mlx_qwen35.turn.Settings`
    (``think``, ``thinking_budget``, ``sampling``, ``system``, ``max_tokens``)
    may be changed between turns. ``history`` lists each turn's result, whose
    ``prefilled_tokens`` says how many prompt tokens that turn actually ran.
    """

    model: Any = field(repr=False)
    tokenizer: Any = field(repr=False)

    def __post_init__(self):
        self.reset()

    # -- conversation ------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the conversation (settings stay)."""
        self.messages: list[dict] = []
        self.history: list[GenerationResult] = []
        self.media: list[Media] = []  # the conversation's images and videos, in prompt order
        self.cache = self.model.make_cache(self.kv_bits)
        self.tokens: list[int] = []  # the prompt the snapshots belong to
        self.snapshots: list[tuple[int, hybrid.Snapshot]] = [(0, hybrid.snapshot(self.cache))]

    def send(
        self,
        content: str,
        *,
        images: Sequence[ImageSource] = (),
        videos: Sequence[VideoSource] = (),
        stop: Sequence[str] = (),
    ) -> Generation:
        """Stream the reply to a user message, with optional images and videos.

        The turn joins the conversation when the returned generation ends
        (or is closed early).
        """
        if not isinstance(content, str) or not content.strip():
            raise Qwen35Error("message: empty")
        turn = prepare(
            self.model, self.tokenizer, self, content, images=images, videos=videos, stop=stop,
            history=self.messages, history_media=self.media,
        )
        ids = turn.request.prompt.ids
        start = self._restore(ids)
        im_start = special_tokens(self.tokenizer).im_start
        stops = [i for i, t in enumerate(ids) if t == im_start and i > start]
        stops += range(start + SNAPSHOT_EVERY, len(ids), SNAPSHOT_EVERY)
        gen = run(
            self.model, self.tokenizer, replace(turn.request, start=start), self.cache,
            snapshot_at=stops, on_snapshot=self._snap, on_result=lambda r: self._record(turn, r),
        )
        self.tokens = ids
        return gen

    def ask(self, content: str, **kwargs) -> GenerationResult:
        """Send a message (``send``'s arguments) and return the whole reply."""
        gen = self.send(content, **kwargs)
        for _ in gen:
            pass
        return gen.result

    def _record(self, turn: Turn, r: GenerationResult) -> None:
        self.media += turn.media
        reply = {"role": "assistant", "content": r.text}
        if r.reasoning:
            reply["reasoning_content"] = r.reasoning
        self.messages += [turn.messages[-1], reply]
        self.history.append(r)

    def _snap(self, n: int) -> None:
        self.snapshots.append((n, hybrid.snapshot(self.cache)))
        if len(self.snapshots) > MAX_SNAPSHOTS:
            del self.snapshots[1]  # the empty-cache snapshot at 0 always stays

    def _restore(self, ids: list[int]) -> int:
        """Rewind the cache to the latest snapshot inside the shared prefix; return its offset."""
        common = 0
        for a, b in zip(ids, self.tokens):
            if a != b:
                break
            common += 1
        # At least one prompt token must run to give the next token's logits.
        limit = min(common, len(ids) - 1)
        self.snapshots = [(n, s) for n, s in self.snapshots if n <= common]
        n, snap = max((x for x in self.snapshots if x[0] <= limit), key=lambda x: x[0])
        hybrid.restore(self.cache, snap, n)
        return n

    # -- sessions ----------------------------------------------------------------------------

    def save(self, path: Union[str, Path]) -> Path:
        """Write the conversation, settings and full cache to one safetensors file, atomically."""
        path = Path(path)
        arrays = _cache_arrays("cache", self.cache)
        for j, (_, snap) in enumerate(self.snapshots):
            arrays.update(
                {f"snap.{j}.{i}.{k}": s[k] for i, s in enumerate(snap) if s and s[0] is not None for k in (0, 1)}
            )
        for j, m in enumerate(self.media):
            arrays[f"media.{j}"] = m.encode(self.model)
        meta = {
            "format": SESSION_FORMAT,
            "version": SESSION_VERSION,
            "model": model_identity(self.model),
            "messages": self.messages,
            "settings": {
                f.name: vars(self.sampling) if f.name == "sampling" and self.sampling else getattr(self, f.name)
                for f in fields(Settings)
            },
            "tokens": self.tokens,
            "snapshots": [n for n, _ in self.snapshots],
            "media": [{"kind": m.kind, "grid": m.grid.tolist(), "timestamps": m.timestamps} for m in self.media],
            "kv_offsets": [c.offset if not isinstance(c, ArraysCache) else None for c in self.cache],
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

    @classmethod
    def load(cls, path: Union[str, Path], model, tokenizer) -> "Chat":
        """Resume a saved session with ``model``, exactly where it stopped."""
        path = Path(path)
        meta, arrays = _read_session(path)
        if meta.get("format") != SESSION_FORMAT:
            raise Qwen35Error(f"{path}: not an mlx_qwen35 session file")
        if meta.get("version") != SESSION_VERSION:
            raise Qwen35Error(
                f"{path}: session format version {meta.get('version')}; this mlx_qwen35 reads {SESSION_VERSION}"
            )
        _check_meta(path, meta, len(model.make_cache()))
        if meta["model"] != model_identity(model):
            raise Qwen35Error(f"{path}: saved with a different model; load it with the model it was saved with")
        digest = meta.pop("digest", None)
        if digest != _digest(meta, arrays):
            raise Qwen35Error(f"{path}: damaged or modified (its checksum does not match)")
        settings = dict(meta["settings"])
        settings["sampling"] = None if settings["sampling"] is None else Sampling(**settings["sampling"])
        chat = cls(model, tokenizer, **settings)
        chat.messages = meta["messages"]
        chat.tokens = meta["tokens"]
        try:
            chat.media = [
                Media(m["kind"], np.array(m["grid"]), timestamps=m["timestamps"], features=arrays[f"media.{j}"])
                for j, m in enumerate(meta["media"])
            ]
            _set_cache(chat.cache, arrays, "cache", meta["kv_offsets"])
        except KeyError as e:
            raise Qwen35Error(f"{path}: lacks tensor {e} (damaged, or not written by Chat.save)") from None
        chat.snapshots = []
        for j, n in enumerate(meta["snapshots"]):
            snap = [
                (arrays.get(f"snap.{j}.{i}.0"), arrays.get(f"snap.{j}.{i}.1")) if isinstance(c, ArraysCache) else None
                for i, c in enumerate(chat.cache)
            ]
            chat.snapshots.append((n, snap))
        return chat


_NUMBER, _INTS = (int, float), (int, type(None))
# What load reads from the metadata: key → (types, what is expected); lists give their items' types.
_META = {
    "model": (str, "text"),
    "messages": ([dict], "a list of messages"),
    "settings": (dict, "an object"),
    "tokens": ([int], "a list of token ids"),
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
        return isinstance(value, kinds) and (not isinstance(value, bool) or kinds is bool)  # True is an int too

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
    for j, m in enumerate(meta["media"]):
        check(f"media.{j}.", m, _MEDIA)
    for j, m in enumerate(meta["messages"]):
        check(f"messages.{j}.", m, {"role": (str, "a role")})
    if len(meta["kv_offsets"]) != layers:
        raise Qwen35Error(f"{path}: session metadata 'kv_offsets' has {len(meta['kv_offsets'])} layers, not {layers}")


def _cache_arrays(prefix: str, cache: list[Any]) -> dict[str, mx.array]:
    out = {}
    for i, c in enumerate(cache):
        if isinstance(c, ArraysCache):
            if c[0] is not None:
                out[f"{prefix}.{i}.0"], out[f"{prefix}.{i}.1"] = c[0], c[1]
        elif c.offset:
            keys, values = c.keys_and_values() if hasattr(c, "keys_and_values") else c.state[:2]
            for name, part in (("k", keys), ("v", values)):
                parts = part if isinstance(part, tuple) else (part,)
                for j, p in enumerate(parts):
                    out[f"{prefix}.{i}.{name}{j}"] = p
    return out


def _set_cache(cache: list[Any], arrays: dict, prefix: str, kv_offsets: list) -> None:
    for i, c in enumerate(cache):
        if isinstance(c, ArraysCache):
            if f"{prefix}.{i}.0" in arrays:
                c[0], c[1] = arrays[f"{prefix}.{i}.0"], arrays[f"{prefix}.{i}.1"]
        elif kv_offsets[i]:
            parts = {name: [arrays[k] for k in sorted(a for a in arrays if a.startswith(f"{prefix}.{i}.{name}"))]
                     for name in ("k", "v")}
            keys, values = (tuple(parts[n]) if len(parts[n]) > 1 else parts[n][0] for n in ("k", "v"))
            c.keys, c.values, c.offset = keys, values, kv_offsets[i]


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
