"""The server's prefix store: whole cache states at message boundaries, shared by every request.

A :class:`~mlx_qwen35.chat.Chat` keeps one conversation's snapshots; the
server keeps them for every conversation it has seen, keyed by the exact
prompt tokens before each message (the positions of ``<|im_start|>``, where
Chat takes its snapshots). A request restores the longest stored prefix of its
tokens and prefills only the rest.

A Chat snapshot of an attention layer is empty (the live cache is cut back),
so an entry here owns all of the state: every layer's arrays and meta state
(the cache protocol of :mod:`mlx_qwen35.model.cache`), copied to contiguous
arrays of exactly ``n`` tokens, so that an entry never keeps a larger buffer
alive and its bytes are what it costs. The least recently used entries are
evicted when the store holds more than its budget.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import mlx.core as mx
import numpy as np


@dataclass
class Entry:
    n: int  # prompt tokens the state holds
    layers: list[tuple[dict, Any]]  # per layer: (state arrays, meta state)
    nbytes: int


def prefix_keys(ids: Sequence[int], ends: Iterable[int]) -> list[tuple[int, bytes]]:
    """``(n, key of ids[:n])`` for each ``n`` in ``ends``, ascending; one pass over the tokens."""
    tokens = np.asarray(ids, dtype=np.int64)
    h, pos, out = hashlib.blake2b(digest_size=16), 0, []
    for n in sorted(set(ends)):
        h.update(tokens[pos:n].tobytes())
        pos = n
        out.append((n, h.copy().digest()))
    return out


def key_of(ids: Sequence[int]) -> bytes:
    return prefix_keys(ids, [len(ids)])[0][1]


class PrefixStore:
    """Cache states by prompt prefix, least recently used evicted past ``budget`` bytes."""

    def __init__(self, budget: int):
        self.budget = budget
        self.entries: OrderedDict[bytes, Entry] = OrderedDict()
        self.nbytes = 0

    def put(self, ids: Sequence[int], cache: list[Any]) -> None:
        """Keep ``cache``, which holds exactly the tokens ``ids``."""
        key = key_of(ids)
        if key in self.entries:
            self.entries.move_to_end(key)
            return
        # Copies: a view would pin the live cache's whole buffer and block its in-place updates.
        layers = [({k: mx.contiguous(a) for k, a in c.state.items()}, c.meta_state) for c in cache]
        mx.eval([a for state, _ in layers for a in state.values()])
        nbytes = sum(a.nbytes for state, _ in layers for a in state.values())
        if nbytes > self.budget:
            return
        self.entries[key] = Entry(len(ids), layers, nbytes)
        self.nbytes += nbytes
        while self.nbytes > self.budget:
            _, old = self.entries.popitem(last=False)
            self.nbytes -= old.nbytes

    def lookup(self, ids: Sequence[int], boundaries: Iterable[int]) -> Optional[Entry]:
        """The entry of the longest prefix ``ids[:n]`` stored, ``n`` among ``boundaries``."""
        for n, key in reversed(prefix_keys(ids, boundaries)):
            entry = self.entries.get(key)
            if entry is not None and entry.n == n:
                self.entries.move_to_end(key)
                return entry
        return None

    @staticmethod
    def restore(entry: Entry, cache: list[Any]) -> None:
        """Put ``entry`` into a fresh ``cache``: meta state, then state, as the cache protocol says."""
        for c, (state, meta) in zip(cache, entry.layers):
            c.meta_state = meta
            # Fresh array objects: a cache's in-place update (a[...] = x) rebinds the object it holds.
            c.state = {k: a[...] for k, a in state.items()}
