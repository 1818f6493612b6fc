"""The model thread: every MLX call of the server (the load too) runs on it.

Requests wait in arrival order in a bounded queue, and decode together as rows
of one :class:`~mlx_qwen35.batch.Batch` (continuous batching): each joins as
soon as there is a free row (``batch_size``), prefilled on its own from its
longest stored prefix, and leaves when it ends. A request with a seed (so
that it samples as it would alone) or a server with a quantized KV cache
(``kv_bits``, which a batch cannot hold) runs alone, after the batch drains.

Each :class:`Job` carries its own event queue on the asyncio side, which the
worker feeds with ``loop.call_soon_threadsafe``: a :class:`Started`, then the
:class:`~mlx_qwen35.stream.Piece` objects, then the
:class:`~mlx_qwen35.engine.GenerationResult`; or a :class:`Failed` at any
point. A job whose client has gone is cancelled: the worker skips it if it has
not started, or ends its generation at the next token.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional

import mlx.core as mx
from mlx_lm.generate import wired_limit

from ..batch import Batch
from ..engine import GenerationResult, check_context, prefill, run
from ..errors import Qwen35Error
from ..model import cache as hybrid
from ..tokenizer import special_tokens
from ..tools import CALL_OPEN
from ..turn import Settings, prepare
from .prompt_cache import PrefixStore, key_of, prefix_keys
from .protocol import ApiError, ChatParams

log = logging.getLogger("mlx_qwen35.server")


@dataclass
class Started:
    prompt_tokens: int
    cached_tokens: int


@dataclass
class Failed:
    error: ApiError


class Cancelled(Exception):
    """The client went away while the prompt was prefilled."""


@dataclass(eq=False)
class Job:
    id: str
    params: ChatParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def cancel(self) -> None:
        self.cancelled.set()


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"retry after {retry_after} s")
        self.retry_after = retry_after


class Worker:
    """Owns the model; ``load()`` returns ``(model, tokenizer)`` and runs on the worker thread.

    ``batch_size`` requests decode at once and ``queue_size`` more may wait;
    ``cache_memory`` bytes of cache states are kept for prefix reuse.
    ``processors(job)`` (a test hook) adds logits processors to a job's generation.
    """

    def __init__(
        self,
        load: Callable[[], tuple[Any, Any]],
        *,
        queue_size: int = 16,
        cache_memory: int = 4 << 30,
        kv_bits: Optional[int] = None,
        batch_size: int = 8,
    ):
        if batch_size < 1:
            raise Qwen35Error(f"batch size: must be ≥ 1, got {batch_size}")
        self._load = load
        self.queue_size, self.batch_size = queue_size, batch_size
        self.kv_bits = kv_bits
        self.store = PrefixStore(cache_memory)
        self.processors: Optional[Callable[[Job], list]] = None
        self.model = self.tokenizer = None
        self.running: set[Job] = set()
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._pending: set[Job] = set()
        self._lock = threading.Lock()
        self._seconds_per_job = 1.0  # a running mean, for Retry-After
        self._ready = threading.Event()
        self._load_error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._main, name="mlx_qwen35 model", daemon=True)

    # -- the asyncio side ------------------------------------------------------------------

    def start(self) -> None:
        """Start the thread and wait for the model; a load error is raised here."""
        self._thread.start()
        self._ready.wait()
        if self._load_error is not None:
            raise self._load_error

    @property
    def waiting(self) -> int:
        return len(self._pending)

    def submit(self, job: Job) -> None:
        """Queue ``job``; :class:`QueueFull` when ``queue_size`` jobs wait already."""
        with self._lock:
            if len(self._pending) >= self.queue_size:
                raise QueueFull(max(1, math.ceil(self._seconds_per_job * (len(self._pending) + 1))))
            self._pending.add(job)
        self._jobs.put(job)

    def cancel_all(self) -> None:
        """Cancel the running jobs and those waiting: their clients get an answer at once."""
        with self._lock:
            jobs = [*self._pending, *self.running]
        for job in jobs:
            job.cancel()

    def stop(self, timeout: Optional[float] = None) -> None:
        """Cancel what runs and what waits, and end the thread."""
        self.cancel_all()
        self._jobs.put(None)
        self._thread.join(timeout)

    # -- the model thread ------------------------------------------------------------------

    def _main(self) -> None:
        try:
            try:
                self.model, self.tokenizer = self._load()
                self._special = special_tokens(self.tokenizer)
                self._newline = self.tokenizer.encode("\n", add_special_tokens=False)
                self._call_token = self.tokenizer.convert_tokens_to_ids(CALL_OPEN)
                self._im_end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
            except BaseException as e:  # noqa: BLE001 - raised again by start(), in the caller's thread
                self._load_error = e
                return
            finally:
                self._ready.set()
            with wired_limit(self.model):  # on an Apple GPU, keep the weights wired as mlx-lm does
                self._loop()
        finally:
            self._drain()
            mx.clear_streams()  # MLX can abort at exit after work in a thread whose streams remain

    def _loop(self) -> None:
        """Take jobs while there are free rows, run a batch step, again; the queue's None stops it."""
        batch = Batch(self.model, self.tokenizer, max_rows=self.batch_size)
        live: dict[Job, tuple[list[int], float]] = {}  # the batch's jobs: their prompt ids, when they joined
        held: Optional[Job] = None  # a job that runs alone, once the batch has drained
        while True:
            while held is None and len(live) < self.batch_size:
                try:
                    job = self._jobs.get(block=not live)
                except queue.Empty:
                    break
                if job is None:
                    self._end_batch(batch, live)
                    return
                if job.params.settings.get("seed") is not None or self.kv_bits is not None:
                    held = job
                else:
                    self._join(job, batch, live)
            if held is not None and not live:
                self._alone(held)
                held = None
            if live:
                batch = self._step(batch, live)

    def _end_batch(self, batch: Batch, live: dict) -> None:
        for job in live:
            job.cancel()
        while live:
            self._step(batch, live)

    def _alone(self, job: Job) -> None:
        with self._lock:
            self._pending.discard(job)
            self.running.add(job)
        started = time.perf_counter()
        try:
            self._serve(job)
        finally:
            self._done(job, started)

    def _done(self, job: Job, started: float) -> None:
        with self._lock:
            self.running.discard(job)
        self._seconds_per_job += (time.perf_counter() - started - self._seconds_per_job) / 4

    def _join(self, job: Job, batch: Batch, live: dict) -> None:
        """Start ``job`` as a row of ``batch``: it is prefilled at the next step."""
        with self._lock:
            self._pending.discard(job)
            self.running.add(job)
        if job.cancelled.is_set():
            self._fail(job, ApiError(503, "cancelled before it started (the client left, or the server is stopping)"))
            return self._done(job, time.perf_counter())
        try:
            request, ids, bounds, cache, snap = self._prepare(job)
            check_context(self.model, request)
        except Exception as e:  # noqa: BLE001 - the client gets an answer and the server stays up
            self._fail(job, self._api_error(job, e))
            return self._done(job, time.perf_counter())
        batch.add(job, request, cache, snapshot_at=[b for b in bounds if b > request.start], on_snapshot=snap,
                  keep_cache=not job.params.images)
        job.emit(Started(len(ids), request.start))
        live[job] = (ids, time.perf_counter())

    def _step(self, batch: Batch, live: dict) -> Batch:
        """One step of ``batch``: hand out its pieces and results; a step that raises fails all its jobs."""
        for job in live:
            if job.cancelled.is_set():
                batch.cancel(job)
        try:
            events = batch.step()
        except Exception as e:  # noqa: BLE001 - every row was in that step
            for job, (_, started) in live.items():
                self._fail(job, self._api_error(job, e))
                self._done(job, started)
            live.clear()
            return Batch(self.model, self.tokenizer, max_rows=self.batch_size)
        for event in events:
            job, result = event.key, event.result
            if result is None:
                job.emit(event.piece)
                continue
            ids, started = live.pop(job)
            if result.finish_reason == "error":
                self._fail(job, self._api_error(job, event.exception or Qwen35Error(result.error)))
            else:
                if event.cache is not None and result.finish_reason != "interrupted":
                    self._keep_reply(ids, result, event.cache)
                job.emit(result)
                self._log(job, result)
            self._done(job, started)
        return batch

    def _drain(self) -> None:
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job.emit(Failed(ApiError(503, "the server is shutting down")))

    def _serve(self, job: Job) -> None:
        if job.cancelled.is_set():
            self._fail(job, ApiError(503, "cancelled before it started (the client left, or the server is stopping)"))
            return
        try:
            gen, ids, start, cache = self._begin(job)
            job.emit(Started(len(ids), start))
            for piece in gen:
                job.emit(piece)
                if job.cancelled.is_set():
                    gen.close()
                    break
        except Exception as e:  # noqa: BLE001 - whatever happens, the client gets an answer and the server stays up
            self._fail(job, self._api_error(job, e))
            return
        result = gen.result
        if not job.params.images and result.finish_reason != "interrupted":
            self._keep_reply(ids, result, cache)
        job.emit(result)
        self._log(job, result)

    def _begin(self, job: Job):
        """Render the prompt, restore its longest stored prefix, and start the generation."""
        request, ids, bounds, cache, snap = self._prepare(job)
        gen = run(
            self.model, self.tokenizer, request, cache,
            snapshot_at=[b for b in bounds if b > request.start], on_snapshot=snap,
        )
        return gen, ids, request.start, cache

    def _prepare(self, job: Job):
        """Render the prompt and restore its longest stored prefix: the request, its ids, its message
        boundaries, its cache, and what snapshots the cache at a boundary."""
        p = job.params
        context = self.model.config.text.max_position_embeddings
        settings = Settings(
            **p.settings, max_tokens=min(p.max_tokens or context, context), kv_bits=self.kv_bits, tools=p.tools or None
        )
        processors = [*self.processors(job)] if self.processors is not None else []
        if p.tool_choice == "none" and p.tools and self._call_token is not None:
            processors.append(self._ban_calls)
        turn = prepare(
            self.model, self.tokenizer, settings, p.messages, images=p.images, stop=p.stop, processors=processors
        )
        ids = turn.request.prompt.ids
        # Vision tokens stand for an image whose pixels are not in the ids: no reuse past the first.
        vision = (self.model.config.image_token_id, self.model.config.video_token_id)
        limit = next((i for i, t in enumerate(ids) if t in vision), len(ids) - 1)
        bounds = [i for i, t in enumerate(ids) if t == self._special.im_start and 0 < i <= limit]
        keys = dict(prefix_keys(ids, bounds))
        cache = self.model.make_cache(self.kv_bits)
        entry = self.store.lookup(keys.items())
        start = 0
        if entry is not None:
            self.store.restore(entry, cache)
            start = entry.n

        def snap(n: int) -> None:
            if job.cancelled.is_set():
                raise Cancelled
            self.store.put(keys[n], n, cache)

        # tool_choice "none": the tools are shown to the model, which may not call them.
        request = replace(turn.request, start=start, tools=() if p.tool_choice == "none" else turn.request.tools)
        return request, ids, bounds, cache, snap

    @staticmethod
    def _api_error(job: Job, e: Exception) -> ApiError:
        if isinstance(e, ApiError):
            return e
        if isinstance(e, Qwen35Error):
            return ApiError.from_error(e)
        if isinstance(e, Cancelled):
            return ApiError(503, "cancelled during its prefill (the client left, or the server is stopping)")
        log.exception("%s failed", job.id)  # a bug: answered 500
        return ApiError(500, f"internal error: {type(e).__name__}: {e}")

    def _ban_calls(self, tokens: mx.array, logits: mx.array) -> mx.array:
        """A logits processor: the model cannot open a tool call."""
        return mx.where(mx.arange(logits.shape[-1]) == self._call_token, -mx.inf, logits)

    def _keep_reply(self, ids: list[int], r: GenerationResult, cache: list) -> None:
        """Store the state after the reply and its end, where the client's next message will start."""
        im_end = self._im_end
        if not r.tokens or r.tokens[-1] != im_end or hybrid.offset(cache) != len(ids) + len(r.tokens) - 1:
            return
        prefill(self.model, [im_end, *self._newline], cache)
        mx.eval([c.state for c in cache])
        held = ids + r.tokens + self._newline
        self.store.put(key_of(held), len(held), cache)

    def _fail(self, job: Job, error: ApiError) -> None:
        log.info("%s %d %s", job.id, error.status, error.message)
        job.emit(Failed(error))

    def _log(self, job: Job, r: GenerationResult) -> None:
        stats = {
            "prompt": r.prompt_tokens,
            "cached": r.prompt_tokens - r.prefilled_tokens,
            "generated": r.generation_tokens,
            "tps": r.generation_tps,
            "finish": r.finish_reason,
        }
        log.info(
            "%s prompt=%d cached=%d generated=%d tok/s=%.1f finish=%s", job.id, *stats.values(), extra={"stats": stats}
        )
