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
from typing import Any, Hashable, Optional

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
from .errors import Qwen35Error
from .model import batch_cache
from .stream import Piece


@dataclass
class Event:
    """What a step produced for the request ``key``: a piece of its text, or its result once it ended."""

    key: Hashable
    piece: Optional[Piece] = None
    result: Optional[GenerationResult] = None


class _Row:
    """One sequence of the batch: its request and what decodes it."""

    def __init__(self, key, model, tokenizer, request: Request, cache):
        self.key, self.request, self.cache = key, request, cache
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

    def end(self, finish: str, error: Optional[str] = None) -> list[Event]:
        pieces = self.stream.finish()
        if finish == "stop" and self.stream.tool_calls and not self.stream.stopped:
            finish = "tool_calls"  # the model ended its turn to call
        result = make_result(self.request, self.stream, self.tokens, finish, self.times)
        result.error = error
        return [Event(self.key, piece=p) for p in pieces] + [Event(self.key, result=result)]


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
        self._ended: list[Event] = []  # results of requests that ended outside a step
        self._cancelled: set = set()

    @property
    def active(self) -> bool:
        """Whether a step has anything to do."""
        return bool(self.rows or self.waiting or self._ended)

    def add(self, key: Hashable, request: Request, cache: Optional[list[Any]] = None) -> None:
        """Queue ``request`` under ``key`` (unique among the batch's requests); it joins at a next step.

        ``cache``: a single-sequence cache already holding the prompt's first
        ``request.start`` tokens. A prompt too long for the context ends at
        the next step with finish reason "error".
        """
        row = _Row(key, self.model, self.tokenizer, request, cache)
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
        """Hand out the last step's tokens as pieces (and results), and start the next step."""
        events, self._ended = self._ended, []
        inputs = self._take_sampled(events)
        logits = []
        if self.rows:
            deltas = [r.request.prompt.rope_delta for r in self.rows]
            delta = mx.array(deltas) if any(deltas) else 0
            logits.append(self.model(mx.array(inputs)[:, None], cache=self.cache, rope_delta=delta)[:, -1])
        logits += self._admit(events)
        self._sampled = self._sample(mx.concatenate(logits)) if logits else None
        if self._sampled is not None:
            mx.async_eval(self._sampled)
        self._cancelled -= {e.key for e in events if e.result is not None}
        return events

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
                events += row.end(finish)
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
        plain = [r for r in joining if r.cache is None and r.request.prompt.embeddings is None]
        groups = ([plain] if plain else []) + [[r] for r in joining if r not in plain]
        logits = []
        for group in groups:
            try:
                cache, out = self._prefill_together(group) if group is plain else self._prefill_alone(group[0])
            except Qwen35Error as e:
                for row in group:
                    events += row.end("error", str(e))
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


# ---------------------------------------------------------------------------------------------
# The one-shot API: a list of prompts in, a result per prompt out.

ITEM_KEYS = ("prompt", "images", "videos", "stop")  # besides Settings' fields, less kv_bits and seed


class BatchGeneration:
    """An iterator of ``(index, piece)``: the pieces of every sequence, each tagged with its prompt's index.

    ``results[i]`` is set once sequence ``i`` ends (``on_result(i, result)``
    is called then). Closing it early ends the rest as "interrupted".
    """

    def __init__(self, batch: Batch, n: int, on_result=None):
        self.batch, self.results = batch, [None] * n
        self._on_result = on_result
        self._pieces: list[tuple[int, Piece]] = []

    def __iter__(self):
        return self

    def __next__(self) -> tuple[int, Piece]:
        while not self._pieces:
            if not self.batch.active:
                raise StopIteration
            self._take(self.batch.step())
        return self._pieces.pop(0)

    def close(self) -> None:
        for key in range(len(self.results)):
            self.batch.cancel(key)
        while self.batch.active:
            self._take(self.batch.step())

    def _take(self, events: list[Event]) -> None:
        for e in events:
            if e.result is None:
                self._pieces.append((e.key, e.piece))
                continue
            self.results[e.key] = e.result
            if self._on_result is not None:
                self._on_result(e.key, e.result)


def stream_batch_generate(
    model, tokenizer, prompts, *, seed: Optional[int] = None, max_rows: int = 32, on_result=None, **settings
) -> BatchGeneration:
    """Generate replies to many prompts at once, streaming ``(index, piece)`` pairs.

    Each prompt is a string or a message list (as :func:`~.generate.stream_generate`
    takes), or a dict with the prompt under ``"prompt"`` and its own
    ``images``, ``videos``, ``stop`` and settings (``think``, ``thinking_budget``,
    ``sampling``, ``max_tokens``, ``system``, ``tools``), which override the
    keyword ``settings`` shared by all. ``seed`` seeds the batch's sampling
    once. At most ``max_rows`` sequences decode at once; the others join as
    rows free up. A prompt that fails (a bad image, too long for the context)
    gets a result with finish reason "error" and ``error`` saying why.
    """
    from .turn import Settings, prepare

    fields = set(Settings.__dataclass_fields__) - {"kv_bits", "seed"}
    for name in settings:
        if name not in fields and name not in ITEM_KEYS[1:]:
            raise Qwen35Error(f"batch: unknown setting {name!r}; expected one of {', '.join(sorted(fields))}")
    if seed is not None:
        mx.random.seed(seed)
    mx.reset_peak_memory()
    batch = Batch(model, tokenizer, max_rows=max_rows)
    for i, item in enumerate(prompts):
        spec = {**settings, **(item if isinstance(item, dict) else {"prompt": item})}
        unknown = [k for k in spec if k not in fields and k not in ITEM_KEYS]
        if unknown or "prompt" not in spec:
            what = f"unknown key {unknown[0]!r}" if unknown else "no 'prompt'"
            raise Qwen35Error(f"prompts[{i}]: {what}; expected {', '.join(ITEM_KEYS)} and settings")
        try:
            turn = prepare(
                model,
                tokenizer,
                Settings(**{k: v for k, v in spec.items() if k in fields}),
                spec["prompt"],
                images=spec.get("images", ()),
                videos=spec.get("videos", ()),
                stop=spec.get("stop", ()),
            )
        except Qwen35Error as e:
            batch.fail(i, str(e))
            continue
        batch.add(i, turn.request)
    return BatchGeneration(batch, len(prompts), on_result)


def batch_generate(model, tokenizer, prompts, **options) -> list[GenerationResult]:
    """Generate the replies to ``prompts`` at once, one result per prompt, in order.

    ``options`` are :func:`stream_batch_generate`'s keyword arguments.
    """
    gen = stream_batch_generate(model, tokenizer, prompts, **options)
    for _ in gen:
        pass
    return gen.results
