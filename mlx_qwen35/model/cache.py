"""The hybrid cache: conv + recurrent state per Gated DeltaNet layer, KV per attention layer.

Every layer's cache answers the same few questions, so whatever keeps, saves
or rolls back a cache (a chat, a session file; the server, batching and
speculative decoding later) never asks which kind of layer it holds:

* ``state``: its arrays by name (``{}`` while empty); assigning such a dict
  puts them back. Every array has the batch of sequences on axis 0, so a
  batch is one cache whose rows can be selected or joined as mlx-lm's batch
  caches do.
* ``meta_state``: what the arrays leave out, as JSON: an attention layer's
  token count; ``None`` for a recurrent layer, whose state has no length.
  Assigning the meta state, then the state, restores a saved layer.
* ``snapshot()`` and ``restore(snapshot, n_tokens)``: back to an earlier
  point. Attention KV is cut back to ``n_tokens``, so its snapshot is empty;
  a recurrent state cannot be cut back, so its snapshot keeps the arrays (by
  reference: MLX arrays are immutable, so that costs no copy). Rolling back a
  few steps, as speculative decoding does after rejected drafts, is
  :func:`keep`: a recurrent layer told to ``record`` keeps the state after
  every step of its next forward, and takes the one after the last accepted token.
"""

from __future__ import annotations

from typing import Any, Optional

import mlx.core as mx
from mlx_lm.models.cache import ArraysCache, KVCache, QuantizedKVCache

KV_BITS = (4, 8)


class RecurrentCache(ArraysCache):
    """A Gated DeltaNet layer: its conv tail (``"0"``) and recurrent state (``"1"``).

    ``left_padding`` (per row, a batch prefilled together) masks the steps
    before each row's prompt: they must not reach its conv or its state.
    """

    def __init__(self, left_padding: Optional[list[int]] = None):
        super().__init__(size=2, left_padding=left_padding)
        self.record = False  # keep every step's conv tail and state in the next forwards
        self.conv_inputs = None  # the last recorded forward's conv input, the old tail first
        self.step_states = None  # the recurrent state after each of its steps

    def keep(self, n: int) -> None:
        """Back to the state after the first ``n`` (≥ 1) tokens of the last recorded forward."""
        tail = self.conv_inputs.shape[1] - len(self.step_states)
        self.cache = [mx.contiguous(self.conv_inputs[:, n : n + tail]), self.step_states[n - 1]]
        self.conv_inputs = self.step_states = None

    @property
    def state(self) -> dict:
        return {str(i): a for i, a in enumerate(self.cache) if a is not None}

    @state.setter
    def state(self, arrays: dict) -> None:
        self.cache = [arrays.get(str(i)) for i in range(len(self.cache))]

    @property
    def meta_state(self) -> None:
        return None

    @meta_state.setter
    def meta_state(self, value) -> None:
        pass

    def snapshot(self) -> dict:
        return self.state

    def restore(self, snapshot: dict, n_tokens: int) -> None:
        self.state = snapshot


class _Attention:
    """What the float and the quantized KV caches share: cut back by offset.

    Keys and values are each held in ``PARTS`` arrays, named ``k0``… and ``v0``….
    """

    PARTS = 1

    @property
    def state(self) -> dict:
        if not self.offset:
            return {}
        keys, values = self.keys_and_values()
        return {f"{n}{j}": a for n, x in (("k", keys), ("v", values)) for j, a in enumerate(self.parts(x))}

    @state.setter
    def state(self, arrays: dict) -> None:
        if arrays:
            self.keys, self.values = (self.whole([arrays[f"{n}{j}"] for j in range(self.PARTS)]) for n in "kv")
        self.offset = self.parts(self.keys)[0].shape[2] if arrays else 0

    @property
    def meta_state(self) -> int:
        return self.offset

    @meta_state.setter
    def meta_state(self, offset: int) -> None:
        self.offset = offset

    def snapshot(self) -> dict:
        return {}

    def restore(self, snapshot: dict, n_tokens: int) -> None:
        self.trim(self.offset - n_tokens)

    @staticmethod
    def parts(x) -> tuple:
        return (x,)

    @staticmethod
    def whole(parts: list):
        return parts[0]


class AttentionCache(_Attention, KVCache):
    """An attention layer's keys (``k0``) and values (``v0``)."""


class QuantizedAttentionCache(_Attention, QuantizedKVCache):
    """Quantized keys and values: packed (``k0``, ``v0``), scales (``k1``, ``v1``), biases (``k2``, ``v2``)."""

    PARTS = 3
    parts = whole = staticmethod(tuple)


def offset(cache: list[Any]) -> int:
    """Tokens the cache holds (its attention layers all agree after a complete step)."""
    return min(c.meta_state for c in cache if c.meta_state is not None)


Snapshot = list  # per layer, what its snapshot() returned


def snapshot(cache: list[Any]) -> Snapshot:
    return [c.snapshot() for c in cache]


def restore(cache: list[Any], snap: Snapshot, n_tokens: int) -> None:
    """Put ``cache`` back to the point ``snap`` was taken at, ``n_tokens`` in."""
    for c, s in zip(cache, snap):
        c.restore(s, n_tokens)


def record(cache: list[Any], on: bool) -> None:
    """Whether the recurrent layers keep every step of the next forwards, for :func:`keep`."""
    for c in cache:
        if isinstance(c, RecurrentCache):
            c.record = on


def keep(cache: list[Any], before: int, n: int) -> None:
    """After a recorded forward from ``before`` tokens, keep its first ``n`` tokens in every layer of ``cache``."""
    for c in cache:
        if isinstance(c, RecurrentCache):
            c.keep(n)
        else:
            c.trim(c.offset - (before + n))
