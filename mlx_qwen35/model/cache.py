"""The hybrid cache: conv + recurrent state per Gated DeltaNet layer, KV per attention layer.

A recurrent state cannot be trimmed back, but it can be copied cheaply (MLX
arrays are immutable, so a snapshot is a set of references) and attention KV
can be cut back by offset. Together that gives :func:`snapshot` and
:func:`restore`: return the whole cache to any earlier point that was
snapshotted.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import ArraysCache

KV_BITS = (4, 8)


def offset(cache: list[Any]) -> int:
    """Tokens the cache holds (its attention layers all agree after a complete step)."""
    return min(c.offset for c in cache if not isinstance(c, ArraysCache))


Snapshot = list  # per layer: (conv, recurrent) for Gated DeltaNet, None for attention


def snapshot(cache: list[Any]) -> Snapshot:
    return [(c[0], c[1]) if isinstance(c, ArraysCache) else None for c in cache]


def restore(cache: list[Any], snap: Snapshot, n_tokens: int) -> None:
    """Put ``cache`` back to the point ``snap`` was taken at, ``n_tokens`` in."""
    for c, s in zip(cache, snap):
        if isinstance(c, ArraysCache):
            c[0], c[1] = s
        else:
            c.trim(c.offset - n_tokens)


def nbytes(arrays) -> int:
    return sum(a.nbytes for a in arrays if isinstance(a, mx.array))


def snapshot_nbytes(snap: Snapshot) -> int:
    return sum(nbytes(s) for s in snap if s is not None)
