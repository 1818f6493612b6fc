"""Many sequences in one hybrid cache: rows join and leave a running batch.

A batch cache is one cache per layer, as for one sequence, with one row per
sequence. Attention layers hold mlx-lm's ``BatchKVCache``: rows are
left-padded to a common length, each with its own offset (its token count,
so each row's RoPE positions are its own) and a mask that hides the padding.
Gated DeltaNet layers hold a :class:`~.cache.RecurrentCache` whose rows have
no length at all; only while a left-padded batch is prefilled does its
``left_padding`` mask the padding steps (the conv sees zeros, the recurrence
leaves the state as it is), so each row's state is the one it would have alone.

A sequence prefilled on its own (any single-sequence cache: with images, or
continuing from a snapshot) joins with :func:`join`; finished rows leave
with :func:`keep`, which copies the remaining rows out and drops the rest.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache

from ..errors import Qwen35Error
from .cache import AttentionCache, RecurrentCache

Cache = list[Any]  # one per layer


class BatchAttentionCache(BatchKVCache):
    """mlx-lm's left-padded batch KV cache; ``state`` is the cache protocol's dict of batch-first arrays."""

    @property
    def state(self) -> dict:
        if self.keys is None:
            return {}
        keys, values = self.keys_and_values()
        return {"k0": keys, "v0": values, "offset": self.offset, "left_padding": self.left_padding}

    @property
    def meta_state(self) -> None:
        return None  # rows differ in length: see ``offset``


def empty(model, left_padding: Sequence[int]) -> Cache:
    """An empty batch cache for prompts left-padded by ``left_padding`` tokens each."""
    pad = list(left_padding)
    # No padding, no recurrent mask: a masked recurrence cannot take MLX's fused Metal kernel.
    recurrent_pad = pad if any(pad) else None
    return [RecurrentCache(recurrent_pad) if layer.is_linear else BatchAttentionCache(pad) for layer in model.layers]


def advance(cache: Cache, n: int) -> None:
    """After a prefill chunk of ``n`` columns: the recurrent masks move on with it."""
    for c in cache:
        if isinstance(c, RecurrentCache):
            c.advance(n)


def finish_prefill(cache: Cache) -> None:
    """Past the padding the recurrent rows need no mask (decode steps are unmasked)."""
    for c in cache:
        if isinstance(c, RecurrentCache):
            c.finalize()


def merge(caches: Sequence[Cache]) -> Cache:
    """One batch cache from single-sequence caches (each row left-padded to the longest)."""
    out = []
    for layer in zip(*caches):
        if isinstance(layer[0], RecurrentCache):
            c = RecurrentCache()
            c.cache = [mx.concatenate([x.cache[i] for x in layer]) for i in range(len(c.cache))]
        elif all(type(x) is AttentionCache for x in layer):
            c = BatchAttentionCache.merge(list(layer))
        else:
            raise Qwen35Error("batch: sequences with a quantized KV cache (kv_bits) cannot join a batch")
        out.append(c)
    return out


def join(batch: Optional[Cache], new: Cache) -> Cache:
    """``batch`` with the rows of the batch cache ``new`` after its own (``batch`` None: ``new``)."""
    if batch is None:
        return new
    for c, n in zip(batch, new):
        c.extend(n)
    return batch


def keep(batch: Cache, rows: Sequence[int]) -> Optional[Cache]:
    """Only ``rows`` of ``batch``, in that order (None if none); the others' memory is freed."""
    if not rows:
        return None
    for c in batch:
        c.filter(list(rows))
    return batch


def extract(batch: Cache, row: int) -> Cache:
    """Row ``row`` of ``batch`` as a single-sequence cache: a copy of its own tokens' state, no padding."""
    out = []
    for c in batch:
        if isinstance(c, RecurrentCache):
            one = RecurrentCache()
            one.cache = [mx.contiguous(a[row : row + 1]) for a in c.cache]
        else:
            one, pad, end = AttentionCache(), int(c.left_padding[row].item()), c.size()
            one.state = {n: mx.contiguous(a[row : row + 1, :, pad:end]) for n, a in (("k0", c.keys), ("v0", c.values))}
        out.append(one)
    return out


def nbytes(cache: Optional[Cache]) -> int:
    return 0 if cache is None else sum(c.nbytes for c in cache)
