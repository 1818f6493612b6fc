"""Many sequences at once: continuous batching.

A decode step of B sequences reads every weight once for B tokens, so where
decoding is bound by memory bandwidth B sequences decode almost as fast as
one. :class:`Batch` keeps a running batch: each :meth:`Batch.step` decodes
one token for every row; between steps new requests join and finished ones
leave (:mod:`.model.batch_cache`), so no row waits for the slowest and none
is prefilled again.

Text prompts that join at the same step are prefilled together, left-padded.
A prompt with images (its own mRoPE positions and rope delta) or one that
continues a cache it brings is prefilled alone, then joins. Each row samples,
streams (:class:`~.stream.TextStream`), ends its thinking
(:class:`~.reasoning.ThinkingControl`) and stops on its own; a request that
fails (too long for the context, bad input) fails alone, its result saying why.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Optional, Sequence

import mlx.core as mx
import numpy as np

from .engine import (
    PREFILL_STEP,
    GenerationResult,
    Request,
    check_context,
    chunk_ends,
    decoding,
    make_result,
    prefill,
    sample_next,
)
from .ops.dispatch import gemv_route
from .errors import Qwen35Error
from .model import batch_cache
from .stream import Piece

PAD_TOKENS = 16  # a prompt is left-padded by at most this, or a quarter of the longest, to be prefilled together


@dataclass
class Event:
    """What a step produced for the request ``key``: a piece of its text, or its result once it ended.

    With the result of a request added with ``keep_cache``, ``cache`` is its
    own cache (as one sequence) after the reply, less the last token. A
    request whose prefill raised ends with finish reason "error" and the
    exception in ``exception``.
    """

    key: Hashable
    piece: Optional[Piece] = None
    result: Optional[GenerationResult] = None
    cache: Optional[list[Any]] = None
    exception: Optional[Exception] = None


class _Row:
    """One sequence of the batch: its request and what decodes it."""

    def __init__(self, key, model, tokenizer, request: Request, cache, snapshot_at=(), on_snapshot=None, keep=False):
        self.key, self.request, self.cache = key, request, cache
        self.snapshot_at, self.on_snapshot, self.keep = snapshot_at, on_snapshot, keep
        self.sampler, self.processors, self.special, self.stream, self.control, self.limit = decoding(
            model, tokenizer, request
        )
        self.tokens: list[int] = []
        self.forced: list[int] = []  # the closing of reasoning, fed one token a step
        self.times = [time.perf_counter()]  # added, then prefilled

    def accept(self, sampled: int) -> tuple[int, list[Piece], Optional[str]]:
        """Take the token sampled for this row: (the token fed next, its pieces, the finish reason if it ends)."""
        if not self.forced:
            closing = self.control.observe(sampled)
            if closing is not None:
                self.forced = closing[: self.limit - len(self.tokens)]
        token = self.forced.pop(0) if self.forced else sampled
        self.tokens.append(token)
        pieces = self.stream.add(token)
        if token in self.special.stop or self.stream.stopped:
            return token, pieces, "stop"
        if len(self.tokens) >= self.limit:
            return token, pieces, "context" if self.limit < self.request.max_tokens else "length"
        return token, pieces, None

    @property
    def alone(self) -> bool:
        """Whether it is prefilled on its own: it brings a cache, has images or takes snapshots."""
        return self.cache is not None or self.request.prompt.embeddings is not None or bool(self.snapshot_at)

    def end(self, finish: str, error: Optional[str] = None, cache=None) -> list[Event]:
        pieces = self.stream.finish()
        if finish == "stop" and self.stream.tool_calls and not self.stream.stopped:
            finish = "tool_calls"  # the model ended its turn to call
        result = make_result(self.request, self.stream, self.tokens, finish, self.times)
        result.error = error
        return [Event(self.key, piece=p) for p in pieces] + [Event(self.key, result=result, cache=cache)]


class Batch:
    """Sequences decoding together; requests join with :meth:`add`, and :meth:`step` moves them all on.

    ``max_rows`` rows decode at once; more requests wait their turn.
    """

    def __init__(self, model, tokenizer, *, max_rows: int = 32, prefill_step: int = PREFILL_STEP):
        if max_rows < 1:
            raise Qwen35Error(f"max_rows: must be ≥ 1, got {max_rows}")
        self.model, self.tokenizer = model, tokenizer
        self.max_rows, self.prefill_step = max_rows, prefill_step
        self.rows: list[_Row] = []  # in the order of the cache's rows
        self.cache: Optional[batch_cache.Cache] = None
        self.waiting: list[_Row] = []
        self._sampled: Optional[mx.array] = None  # the next token of every row, being computed
        self._deferred: Optional[list[int]] = None  # the inputs of a step to build at the next call
        self._ended: list[Event] = []  # results of requests that ended outside a step
        self._cancelled: set = set()

    @property
    def active(self) -> bool:
        """Whether a step has anything to do."""
        return bool(self.rows or self.waiting or self._ended)

    def add(
        self,
        key: Hashable,
        request: Request,
        cache: Optional[list[Any]] = None,
        *,
        snapshot_at: Sequence[int] = (),
        on_snapshot: Optional[Callable[[int], None]] = None,
        keep_cache: bool = False,
    ) -> None:
        """Queue ``request`` under ``key`` (unique among the batch's requests); it joins at a next step.

        ``cache``: a single-sequence cache already holding the prompt's first
        ``request.start`` tokens. ``on_snapshot(n)`` is called once that cache
        holds ``n`` prompt tokens, for each ``n`` in ``snapshot_at``, as
        :func:`~.engine.run` does. ``keep_cache``: the result's event carries
        the request's own cache (:class:`Event`). A prompt too long for the
        context ends at the next step with finish reason "error". A request's
        ``seed`` seeds sampling when it joins: it reproduces
        :func:`~.generate.generate` when the request decodes alone.
        """
        row = _Row(key, self.model, self.tokenizer, request, cache, snapshot_at, on_snapshot, keep_cache)
        try:
            check_context(self.model, request)
        except Qwen35Error as e:
            self._ended += row.end("error", str(e))
            return
        self.waiting.append(row)

    def fail(self, key: Hashable, error: str) -> None:
        """End the request ``key`` (one that could not be made) at the next step: finish reason "error"."""
        result = GenerationResult("", "", "error", 0, 0, 0, 0.0, 0.0, mx.get_peak_memory() / 1e9, error=error)
        self._ended.append(Event(key, result=result))

    def cancel(self, key: Hashable) -> None:
        """End the request ``key`` at the next step, finish reason "interrupted"."""
        self._cancelled.add(key)

    def step(self) -> list[Event]:
        """Hand out the last step's tokens as pieces (and results), and start the next step.

        The next step is queued before the tokens go out, so the model computes
        while the caller detokenizes; but where a step computes as it is built
        (a few rows on the CPU paths: the gemv route of :mod:`.ops.linear`),
        it is built at the next call instead, so the tokens go out first.
        """
        events, self._ended = self._ended, []
        if self._deferred is not None:
            self._launch(self._deferred, events)
        inputs = self._take_sampled(events)
        eager = gemv_route(len(self.rows), self.model.language_model.dtype) is not None
        self._deferred = inputs if eager and (self.rows or self.waiting) else None
        if self._deferred is None:
            self._launch(inputs, events)
        self._cancelled -= {e.key for e in events if e.result is not None}
        return events

    def _launch(self, inputs: list[int], events: list[Event]) -> None:
        """Queue a decode step of the rows (fed ``inputs``) and the prefill of those that join, then sampling."""
        self._deferred = None
        logits = []
        if self.rows:
            deltas = [r.request.prompt.rope_delta for r in self.rows]
            delta = mx.array(deltas) if any(deltas) else 0
            logits.append(self.model(mx.array(inputs)[:, None], cache=self.cache, rope_delta=delta)[:, -1])
        logits += self._admit(events)
        self._sampled = self._sample(mx.concatenate(logits)) if logits else None
        if self._sampled is not None:
            mx.async_eval(self._sampled)

    # -- inside a step

    def _take_sampled(self, events: list[Event]) -> list[int]:
        """Give each row its sampled token; end the rows that are done. Returns the next inputs."""
        if self._sampled is None:
            return []
        inputs, kept = [], []
        for i, (row, sampled) in enumerate(zip(self.rows, self._sampled.tolist())):
            if row.key in self._cancelled:
                events += row.end("interrupted")
                continue
            token, pieces, finish = row.accept(sampled)
            events += [Event(row.key, piece=p) for p in pieces]
            if finish is not None:
                events += row.end(finish, cache=batch_cache.extract(self.cache, i) if row.keep else None)
            else:
                inputs.append(token)
                kept.append(i)
        if len(kept) < len(self.rows):
            self.cache = batch_cache.keep(self.cache, kept)
            self.rows = [self.rows[i] for i in kept]
        return inputs

    def _admit(self, events: list[Event]) -> list[mx.array]:
        """Prefill waiting requests as rows free up, join them; their next-token logits, in join order."""
        for row in [r for r in self.waiting if r.key in self._cancelled]:
            self.waiting.remove(row)
            events += row.end("interrupted")
        room = self.max_rows - len(self.rows)
        joining, self.waiting = self.waiting[:room], self.waiting[room:]
        groups = _length_groups([r for r in joining if not r.alone]) + [[r] for r in joining if r.alone]
        logits = []
        for group in groups:
            for row in group:
                if row.request.seed is not None:
                    mx.random.seed(row.request.seed)
            try:
                # One row alone takes the single-sequence path (no padding: the unmasked attention kernels).
                together = len(group) > 1 and not group[0].alone
                cache, out = self._prefill_together(group) if together else self._prefill_alone(group[0])
            except Exception as e:  # noqa: BLE001 - the group fails alone; the event carries what was raised
                why = str(e) if isinstance(e, Qwen35Error) else f"{type(e).__name__}: {e}"
                for row in group:
                    events += row.end("error", why)
                    events[-1].exception = e
                continue
            for row in group:
                row.times.append(time.perf_counter())
            self.cache = batch_cache.join(self.cache, cache)
            self.rows += group
            logits.append(out)
        return logits

    def _prefill_alone(self, row: _Row) -> tuple[batch_cache.Cache, mx.array]:
        p, start = row.request.prompt, row.request.start
        cache = row.cache if row.cache is not None else self.model.make_cache()
        row.cache = None  # the batch holds it now
        logits = prefill(
            self.model,
            p.ids[start:],
            cache,
            step=self.prefill_step,
            input_embeddings=None if p.embeddings is None else p.embeddings[:, start:],
            positions=None if p.positions is None else p.positions[:, :, start:],
            rope_delta=p.rope_delta,
            stops=[s - start for s in row.snapshot_at],
            on_stop=None if row.on_snapshot is None else lambda n: row.on_snapshot(start + n),
        )
        return batch_cache.merge([cache]), logits[None]

    def _prefill_together(self, rows: list[_Row]) -> tuple[batch_cache.Cache, mx.array]:
        """Prefill text prompts as one left-padded batch, in chunks as :func:`~.engine.prefill` does."""
        ids = [r.request.prompt.ids for r in rows]
        if not all(ids):
            raise Qwen35Error("prompt: empty (nothing to generate from)")
        n = max(map(len, ids))
        padded = np.zeros((len(ids), n), dtype=np.int32)
        for i, x in enumerate(ids):
            padded[i, n - len(x) :] = x
        cache = batch_cache.empty(self.model, [n - len(x) for x in ids])
        lm, tokens = self.model.language_model, mx.array(padded)
        heads = self.model.config.text.num_attention_heads * len(rows)
        start = 0
        for end in chunk_ends(n, 0, heads, self.prefill_step):
            h = lm.hidden_states(tokens[:, start:end], cache)
            batch_cache.advance(cache, end - start)
            if end < n:
                mx.eval([c.state for c in cache])
            start = end
        batch_cache.finish_prefill(cache)
        return cache, lm.logits(h[:, -1])

    def _sample(self, logits: mx.array) -> mx.array:
        """Each row's next token [B]: rows without logits processors sample together, by sampling settings."""
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        groups: dict[Any, list[int]] = {}
        for i, row in enumerate(self.rows):
            groups.setdefault(i if row.processors else row.request.sampling, []).append(i)
        order, parts = [], []
        for idx in groups.values():
            row = self.rows[idx[0]]
            if row.processors:
                parts.append(sample_next(logits[idx[0]], row.sampler, row.processors, row.tokens)[None])
            else:
                parts.append(row.sampler(logprobs[mx.array(idx)] if len(idx) < len(self.rows) else logprobs))
            order += idx
        tokens = mx.concatenate(parts)
        return tokens if order == sorted(order) else tokens[mx.array(np.argsort(order))]


def _length_groups(rows: list[_Row]) -> list[list[_Row]]:
    """Rows to prefill together, left-padded: each padded by at most a quarter of the longest (or 16 tokens).

    Padding is computed and thrown away; what a group saves is reading the
    weights once for all its rows, which matters for short prompts only.
    """
    groups: list[list[_Row]] = []
    size = lambda r: len(r.request.prompt.ids)
    for row in sorted(rows, key=size, reverse=True):
        group = groups[-1] if groups else []
        if group and size(group[0]) - size(row) <= max(PAD_TOKENS, size(group[0]) // 4):
            group.append(row)
        else:
            groups.append([row])
    return groups
