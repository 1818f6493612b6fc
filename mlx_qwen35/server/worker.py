"""The model thread: every MLX call of the server (the load too) runs on it, one request at a time.

Requests wait in arrival order in a bounded queue. Each :class:`Job` carries
its own event queue on the asyncio side, which the worker feeds with
``loop.call_soon_threadsafe``: a :class:`Started`, then the
:class:`~mlx_qwen35.stream.Piece` objects, then the
:class:`~mlx_qwen35.engine.GenerationResult`; or a :class:`Failed` at any
point. A job whose client has gone is cancelled: the worker skips it if it has
not started, or closes its generation at the next piece.
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

from ..engine import GenerationResult, prefill, run
from ..errors import Qwen35Error
from ..model import cache as hybrid
from ..tokenizer import special_tokens
from ..turn import Settings, prepare
from .prompt_cache import PrefixStore
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

    ``queue_size`` requests may wait behind the running one; ``cache_memory``
    bytes of cache states are kept for prefix reuse. ``processors(job)`` (a
    test hook) adds logits processors to a job's generation.
    """

    def __init__(
        self,
        load: Callable[[], tuple[Any, Any]],
        *,
        queue_size: int = 16,
        cache_memory: int = 4 << 30,
        kv_bits: Optional[int] = None,
    ):
        self._load = load
        self.queue_size = queue_size
        self.kv_bits = kv_bits
        self.store = PrefixStore(cache_memory)
        self.processors: Optional[Callable[[Job], list]] = None
        self.model = self.tokenizer = None
        self.running: Optional[Job] = None
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
        """Cancel the running job and those waiting: their clients get an answer at once."""
        with self._lock:
            jobs = [*self._pending, self.running]
        for job in jobs:
            if job is not None:
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
        while True:
            job = self._jobs.get()
            if job is None:
                return
            with self._lock:
                self._pending.discard(job)
                self.running = job
            started = time.perf_counter()
            try:
                self._serve(job)
            finally:
                self.running = None
                self._seconds_per_job += (time.perf_counter() - started - self._seconds_per_job) / 4

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
        except ApiError as e:
            self._fail(job, e)
            return
        except Qwen35Error as e:
            self._fail(job, ApiError.from_error(e))
            return
        except Exception as e:  # noqa: BLE001 - a bug answers 500; the server stays up
            log.exception("%s failed", job.id)
            self._fail(job, ApiError(500, f"internal error: {type(e).__name__}: {e}"))
            return
        job.emit(Started(len(ids), start))
        try:
            for piece in gen:
                job.emit(piece)
                if job.cancelled.is_set():
                    gen.close()
                    break
        except Cancelled:
            log.info("%s cancelled while its prompt was prefilled", job.id)
            return
        except Qwen35Error as e:
            job.emit(Failed(ApiError.from_error(e)))
            return
        except Exception as e:  # noqa: BLE001
            log.exception("%s failed", job.id)
            job.emit(Failed(ApiError(500, f"internal error: {type(e).__name__}: {e}")))
            return
        result = gen.result
        if not job.params.images and result.finish_reason != "interrupted":
            self._keep_reply(ids, result, cache)
        job.emit(result)
        self._log(job, result)

    def _begin(self, job: Job):
        """Render the prompt, restore its longest stored prefix, and start the generation."""
        p = job.params
        context = self.model.config.text.max_position_embeddings
        settings = Settings(**p.settings, max_tokens=min(p.max_tokens or context, context), kv_bits=self.kv_bits)
        turn = prepare(self.model, self.tokenizer, settings, p.messages, images=p.images, stop=p.stop)
        ids = turn.request.prompt.ids
        # Vision tokens stand for an image whose pixels are not in the ids: no reuse past the first.
        vision = (self.model.config.image_token_id, self.model.config.video_token_id)
        limit = next((i for i, t in enumerate(ids) if t in vision), len(ids) - 1)
        bounds = [i for i, t in enumerate(ids) if t == self._special.im_start and 0 < i]
        cache = self.model.make_cache(self.kv_bits)
        entry = self.store.lookup(ids, [b for b in bounds if b <= limit])
        start = 0
        if entry is not None:
            self.store.restore(entry, cache)
            start = entry.n

        def snap(n: int) -> None:
            if job.cancelled.is_set():
                raise Cancelled
            if n <= limit:
                self.store.put(ids[:n], cache)

        request = replace(turn.request, start=start)
        gen = run(
            self.model, self.tokenizer, request, cache,
            snapshot_at=[b for b in bounds if b > start], on_snapshot=snap,
        )
        return gen, ids, start, cache

    def _keep_reply(self, ids: list[int], r: GenerationResult, cache: list) -> None:
        """Store the state after the reply and its end, where the client's next message will start."""
        im_end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        if not r.tokens or r.tokens[-1] != im_end or hybrid.offset(cache) != len(ids) + len(r.tokens) - 1:
            return
        prefill(self.model, [im_end, *self._newline], cache)
        mx.eval([c.state for c in cache])
        self.store.put(ids + r.tokens + self._newline, cache)

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
