"""The decode engine: prefill a cache in chunks, then sample token by token, streaming text.

:func:`run` takes a :class:`Request` and returns a :class:`Generation`, an
iterator of :class:`~mlx_qwen35.stream.Piece` objects over the generator
:func:`steps`, which returns the :class:`GenerationResult` when it ends.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Generator, Iterator, Literal, Optional, Sequence, Union

import mlx.core as mx
import numpy as np

from .errors import Qwen35Error
from .media import PromptInputs
from .model import cache as hybrid
from .model import mtp
from .ops.dispatch import gemv_route
from .reasoning import ThinkingControl
from .sampler import logprobs_after, make_processors, make_sampler
from .sampling import Sampling
from .speculative import DraftPolicy, DraftStats, speculative_tokens
from .stream import Piece, TextStream
from .tokenizer import special_tokens
from .tools import ToolCall

PREFILL_STEP = 2048
ATTENTION_BUDGET = 256 << 20  # bytes of attention scores one prefill chunk may hold


def chunk_ends(n: int, offset: int, heads: int, step: int = PREFILL_STEP, stops: Sequence[int] = ()) -> list[int]:
    """Where prefill chunks of an ``n``-token prompt end, the cache already holding ``offset``.

    Chunks hold at most ``step`` tokens, and fewer when the attention scores
    (heads × chunk × context, float32) would exceed ``ATTENTION_BUDGET``: so
    peak memory stays flat as the context grows. Every offset in ``stops``
    ends a chunk.
    """
    ends, pos = [], 0
    stops = sorted(s for s in stops if 0 < s < n)
    while pos < n:
        c = step
        while c > 64 and heads * c * (offset + pos + c) * 4 > ATTENTION_BUDGET:
            c //= 2
        end = min([n, pos + c] + [s for s in stops if s > pos])
        ends.append(end)
        pos = end
    return ends


def prefill(
    model,
    tokens: Sequence[int],
    cache: list[Any],
    *,
    step: int = PREFILL_STEP,
    input_embeddings: Optional[mx.array] = None,
    positions: Optional[mx.array] = None,
    rope_delta: int = 0,
    stops: Sequence[int] = (),
    on_stop: Optional[Callable[[int], None]] = None,
) -> mx.array:
    """Run ``tokens`` through ``model`` into ``cache``; return the last position's logits [vocab].

    The prompt runs in chunks (:func:`chunk_ends`), the cache evaluated after
    each, so activations never scale with the prompt. ``stops`` are offsets
    where a chunk must end; ``on_stop(offset)`` is called there (to snapshot
    the cache). Only the last position goes through the output head.
    """
    n = len(tokens)
    if n == 0:
        raise Qwen35Error("prompt: empty (nothing to generate from)")
    ids = mx.array(np.asarray(tokens, dtype=np.int32))[None]
    lm = model.language_model
    head = head_cache(cache)
    heads = model.config.text.num_attention_heads
    start = 0
    for end in chunk_ends(n, hybrid.offset(cache), heads, step, stops):
        h = lm.hidden_states(
            ids[:, start:end],
            cache,
            None if input_embeddings is None else input_embeddings[:, start:end],
            None if positions is None else positions[:, :, start:end],
            rope_delta,
        )
        if head is not None:  # the MTP head's KV follows, one token behind
            mtp.append(head, h, ids[:, start:end])
            mtp.catch_up(model, head, rope_delta=rope_delta)
        if end < n:
            mx.eval([c.state for c in cache])
            if on_stop is not None and end in stops:
                on_stop(end)
        start = end
    return lm.logits(h[:, -1])[0]


def head_cache(cache: list[Any]) -> Optional[mtp.MTPCache]:
    """The MTP head's cache, when ``cache`` has one (its last layer)."""
    return cache[-1] if cache and isinstance(cache[-1], mtp.MTPCache) else None


# Plain steps hand the head their states; past this many pending, it writes their KV.
HEAD_PENDING = 64


def sample_next(logits: mx.array, sampler, processors, generated: list[int]) -> mx.array:
    """The next token (a scalar) from one sequence's logits [vocab], after the ``generated`` tokens."""
    return sampler(logprobs_after(logits, processors, generated))[0]


def decode_tokens(
    model,
    logits: mx.array,
    cache: list[Any],
    *,
    sampler,
    processors,
    control: ThinkingControl,
    max_tokens: int,
    rope_delta: int = 0,
    stop: Collection[int] = (),
) -> Iterator[int]:
    """Sample up to ``max_tokens`` tokens, feeding each back through ``cache``, ending after a ``stop`` id.

    The next step is queued before the current token is handed out, so the
    model computes while the caller detokenizes; but where a step computes as
    it is built (on the CPU paths, the gemv route of :mod:`.ops.linear`), the
    token goes out first, else it would wait for the next step. Forced tokens
    (the closing of reasoning) are fed as one chunk and yielded like sampled
    ones.
    """
    generated: list[int] = []
    sample = lambda logits: sample_next(logits, sampler, processors, generated)
    lm, head = model.language_model, head_cache(cache)

    def step(tokens: list[int]) -> mx.array:
        ids = mx.array(tokens)[None]
        h = lm.hidden_states(ids, cache, rope_delta=rope_delta)
        if head is not None:
            mtp.append(head, h, ids)
            if head.pending > HEAD_PENDING:
                mtp.catch_up(model, head, rope_delta=rope_delta)
        return sample(lm.logits(h[:, -1])[0])

    eager = gemv_route(1, model.language_model.dtype) is not None

    def advance(tokens: list[int]) -> Iterator[int]:
        nonlocal y
        if eager:
            yield from tokens
        y = step(tokens)
        mx.async_eval(y)
        if not eager:
            yield from tokens

    y = sample(logits)
    mx.async_eval(y)
    while len(generated) < max_tokens:
        token = y.item()
        forced = control.observe(token)
        if forced is not None:
            forced = forced[: max_tokens - len(generated)]
            generated.extend(forced)
            yield from advance(forced)
            continue
        generated.append(token)
        if token in stop or len(generated) == max_tokens:
            yield token
            return
        yield from advance([token])


# ---------------------------------------------------------------------------------------------
# One generation: what it asks for, what it returns, and the iterator that streams it.


@dataclass(frozen=True)
class Request:
    """A prompt to continue, and how: ``start`` prompt tokens are already in the cache."""

    prompt: PromptInputs
    reasoning: bool  # the prompt leaves a <think> block open
    sampling: Sampling
    max_tokens: int
    thinking_budget: Optional[int] = None
    stop: Sequence[str] = ()  # stop strings
    seed: Optional[int] = None
    start: int = 0
    tools: Sequence[dict] = ()  # function schemas: the reply's tool calls are parsed when there are any
    # extra logits processors (tokens, logits) → logits, run after the penalties
    processors: Sequence[Callable[[mx.array, mx.array], mx.array]] = ()
    draft_tokens: int = 0  # the most tokens the MTP head drafts a step (the cache must have its layer); 0: plain
    draft_vocab: Optional[int] = None  # drafts over the first this many token ids only (None: all)

    def __post_init__(self):
        if self.max_tokens < 1:
            raise Qwen35Error(f"max_tokens: must be ≥ 1, got {self.max_tokens}")
        if self.draft_tokens < 0:
            raise Qwen35Error(f"num_draft_tokens: must be ≥ 0, got {self.draft_tokens}")
        if self.draft_vocab is not None and self.draft_vocab < 1:
            raise Qwen35Error(f"draft_vocab: must be ≥ 1, got {self.draft_vocab}")
        if self.thinking_budget is not None and self.thinking_budget < 0:
            raise Qwen35Error(f"thinking budget: must be ≥ 0, got {self.thinking_budget}")


@dataclass
class GenerationResult:
    text: str
    reasoning: str
    finish_reason: Literal["stop", "length", "context", "interrupted", "tool_calls", "error"]
    prompt_tokens: int
    prefilled_tokens: int  # prompt tokens actually run (the rest came from a cache)
    generation_tokens: int
    prompt_tps: float
    generation_tps: float
    peak_memory_gb: float
    tokens: list[int] = field(default_factory=list, repr=False)
    tool_calls: list[ToolCall] = field(default_factory=list)  # valid or not: see ToolCall.error
    error: Optional[str] = None  # why it failed (finish reason "error"): one sequence of a batch fails alone
    draft_tokens: int = 0  # tokens the MTP head drafted
    accepted_draft_tokens: int = 0  # of which the model accepted


class Interrupted(KeyboardInterrupt):
    """Ctrl-C while the model ran: the KeyboardInterrupt goes on, carrying the generation's ``result``."""

    def __init__(self, result: GenerationResult):
        super().__init__()
        self.result = result


Steps = Generator[Union[mx.array, Piece], None, GenerationResult]


class Generation:
    """An iterator of :class:`Piece` objects; ``result`` is set once it ends.

    Closing it early (or a KeyboardInterrupt while it runs) ends generation
    with finish reason "interrupted". ``on_result(result)`` is called then,
    or when it ends otherwise.
    """

    def __init__(self, steps: Steps, on_result: Optional[Callable[[GenerationResult], None]] = None):
        self._steps = steps
        self._on_result = on_result
        self.result: Optional[GenerationResult] = None
        self.prompt_logits: Optional[mx.array] = None  # the next-token logits [vocab] at the end of the prompt

    def __iter__(self):
        return self

    def __next__(self) -> Piece:
        try:
            step = next(self._steps)
            if isinstance(step, mx.array):  # the first step: the prompt is prefilled
                self.prompt_logits = step
                step = next(self._steps)
            return step
        except StopIteration as end:
            self._end(end.value)
            raise StopIteration from None
        except Interrupted as e:
            self._end(e.result)
            raise

    def close(self) -> None:
        try:
            self._steps.throw(GeneratorExit)  # steps() returns its result to it
        except StopIteration as end:
            self._end(end.value)
        except GeneratorExit:
            pass  # it had not started, or had ended already

    def _end(self, result: GenerationResult) -> None:
        self.result = result
        if self._on_result is not None:
            self._on_result(result)


def check_context(model, request: Request) -> None:
    """Raise when the prompt leaves no room in the model's context for a reply."""
    context = model.config.text.max_position_embeddings
    n = len(request.prompt.ids)
    if n >= context:
        raise Qwen35Error(f"prompt: {n} tokens, longer than the model's context of {context}")


def run(
    model,
    tokenizer,
    request: Request,
    cache: list[Any],
    *,
    snapshot_at: Sequence[int] = (),
    on_snapshot: Optional[Callable[[int], None]] = None,
    on_result: Optional[Callable[[GenerationResult], None]] = None,
) -> Generation:
    """Generate from ``request``: prefill, then sample, as the returned :class:`Generation` is iterated.

    ``on_snapshot(n)`` is called once the cache holds ``n`` prompt tokens, for
    each ``n`` in ``snapshot_at``.
    """
    check_context(model, request)
    return Generation(steps(model, tokenizer, request, cache, snapshot_at, on_snapshot), on_result)


def decoding(model, tokenizer, r: Request) -> tuple:
    """What decodes ``r``: sampler, logits processors, special tokens, text stream, thinking control, token limit."""
    sampler, processors = make_sampler(r.sampling), make_processors(r.sampling, r.max_tokens) + list(r.processors)
    special = special_tokens(tokenizer)
    stream = TextStream(tokenizer, reasoning=r.reasoning, stop=r.stop, tools=r.tools)
    control = ThinkingControl(tokenizer, reasoning=r.reasoning, budget=r.thinking_budget, special=special)
    # The reply ends where the model's context does.
    limit = min(r.max_tokens, model.config.text.max_position_embeddings - len(r.prompt.ids))
    return sampler, processors, special, stream, control, limit


def make_result(
    r: Request,
    stream: TextStream,
    tokens: list[int],
    finish: str,
    times: list[float],
    drafts: DraftStats = DraftStats(),
) -> GenerationResult:
    """The result of ``r`` ending with ``finish``; ``times``: when it started and, once there, was prefilled."""
    end = time.perf_counter()
    start, prefilled = times[0], times[1] if len(times) > 1 else end
    n = len(r.prompt.ids)
    return GenerationResult(
        text="".join(stream.parts["answer"]),
        reasoning="".join(stream.parts["reasoning"]),
        finish_reason=finish,
        prompt_tokens=n,
        prefilled_tokens=n - r.start,
        generation_tokens=len(tokens),
        prompt_tps=(n - r.start) / max(prefilled - start, 1e-9),
        generation_tps=len(tokens) / max(end - prefilled, 1e-9),
        peak_memory_gb=mx.get_peak_memory() / 1e9,
        tokens=tokens,
        tool_calls=stream.tool_calls,
        draft_tokens=drafts.drafted,
        accepted_draft_tokens=drafts.accepted,
    )


def steps(model, tokenizer, r: Request, cache: list[Any], snapshot_at=(), on_snapshot=None) -> Steps:
    """Yield the prompt's next-token logits once prefilled, then the pieces; return the result.

    Thrown a GeneratorExit, it returns the result so far ("interrupted"); a
    KeyboardInterrupt becomes :class:`Interrupted`, which carries it.
    """
    if r.seed is not None:
        mx.random.seed(r.seed)
    sampler, processors, special, stream, control, limit = decoding(model, tokenizer, r)
    p = r.prompt
    mx.reset_peak_memory()
    tokens: list[int] = []
    times = [time.perf_counter()]  # start, then prefilled
    drafts = DraftStats()
    result = lambda finish: make_result(r, stream, tokens, finish, times, drafts)

    try:
        logits = prefill(
            model,
            p.ids[r.start :],
            cache,
            input_embeddings=None if p.embeddings is None else p.embeddings[:, r.start :],
            positions=None if p.positions is None else p.positions[:, :, r.start :],
            rope_delta=p.rope_delta,
            stops=[s - r.start for s in snapshot_at],
            on_stop=None if on_snapshot is None else lambda n: on_snapshot(r.start + n),
        )
        mx.eval(logits)
        times.append(time.perf_counter())
        yield logits
        if r.draft_tokens and head_cache(cache) is not None:
            decoded = speculative_tokens(
                model, logits, cache, sampling=r.sampling, processors=processors, control=control,
                max_tokens=limit, policy=DraftPolicy(r.draft_tokens), stats=drafts, rope_delta=p.rope_delta,
                stop=special.stop, draft_vocab=r.draft_vocab,
            )
        else:
            decoded = decode_tokens(
                model, logits, cache, sampler=sampler, processors=processors, control=control,
                max_tokens=limit, rope_delta=p.rope_delta, stop=special.stop,
            )
        for token in decoded:
            tokens.append(token)
            yield from stream.add(token)
            if token in special.stop or stream.stopped:
                finish = "stop"
                break
        else:
            finish = "context" if limit < r.max_tokens else "length"
        yield from stream.finish()
        if finish == "stop" and stream.tool_calls and not stream.stopped:  # the model ended its turn to call
            finish = "tool_calls"
    except GeneratorExit:  # Generation.close()
        stream.finish()
        return result("interrupted")
    except KeyboardInterrupt:
        stream.finish()
        raise Interrupted(result("interrupted")) from None
    return result(finish)
