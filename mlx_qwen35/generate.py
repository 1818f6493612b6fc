"""Generation: prefill, sampling, streaming, and control of the thinking phase.

``stream_generate`` yields :class:`Piece` objects (text marked reasoning or
answer) as tokens arrive; ``generate`` collects them into a
:class:`GenerationResult`. Both render a user prompt (or a message list) with
the checkpoint's own chat template.
"""

from __future__ import annotations

import math
import numbers
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Iterator, Literal, Optional, Sequence, Union

import mlx.core as mx
import numpy as np
from mlx_lm.sample_utils import make_logits_processors
from mlx_lm.sample_utils import make_sampler as mlx_lm_sampler
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .errors import Qwen35Error
from .media import Media, load_media, prompt_inputs, user_content
from .model import Model
from .model import cache as hybrid
from .processor import ImageSource
from .reasoning import ReasoningSplitter, thinking_opened
from .tokenizer import SpecialTokens, render_text, special_tokens

# Appended when the thinking budget or the loop guard ends reasoning: a sentence
# that reads naturally, then the template's own closing ("\n</think>\n\n").
CLOSING = "\n\nI have thought about this enough; time to give the answer.\n</think>\n\n"
# How many tokens a word cut by the budget may take to finish.
WORD_GRACE = 8
PREFILL_STEP = 2048
ATTENTION_BUDGET = 256 << 20  # bytes of attention scores one prefill chunk may hold


@dataclass(frozen=True)
class Sampling:
    """Sampling settings; ``temperature`` 0 is greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 20
    min_p: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self):
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "repetition_penalty"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise Qwen35Error(f"{name}: must be a finite number, got {value!r}")
        checks = (
            ("temperature", self.temperature >= 0, "≥ 0"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("top_k", self.top_k >= 0, "≥ 0 (0 disables it)"),
            ("min_p", 0 <= self.min_p < 1, "in [0, 1)"),
            ("repetition_penalty", self.repetition_penalty > 0, "> 0"),
        )
        for name, ok, expected in checks:
            if not ok:
                raise Qwen35Error(f"{name}: must be {expected}, got {getattr(self, name)}")


# The Qwen3.5 small-model card's recommended settings (no generation_config.json ships).
PRESETS: dict[str, Sampling] = {
    "thinking": Sampling(temperature=1.0, top_p=0.95, top_k=20, presence_penalty=1.5),
    "thinking-coding": Sampling(temperature=0.6, top_p=0.95, top_k=20),
    "instruct": Sampling(temperature=1.0, top_p=1.0, top_k=20, presence_penalty=2.0),
    "instruct-vision": Sampling(temperature=0.7, top_p=0.8, top_k=20, presence_penalty=1.5),
}


def preset(name: str) -> Sampling:
    if name not in PRESETS:
        raise Qwen35Error(f"preset: {name!r} is not one of {', '.join(PRESETS)}")
    return PRESETS[name]


def default_sampling(think: bool) -> Sampling:
    return PRESETS["thinking" if think else "instruct"]


def make_sampler(s: Sampling) -> Callable[[mx.array], mx.array]:
    """Log-probabilities [1, V] → a token [1].

    As vLLM orders it (the setting behind the model card's numbers):
    temperature, then top-k, then top-p and min-p over the renormalised top-k.
    With top-k on, only those k candidates are sorted: mlx-lm's sampler sorts
    all 248k logits for top-p, which costs ~80 ms a token on a CPU.
    """
    if s.temperature == 0:
        return lambda logprobs: mx.argmax(logprobs, axis=-1)
    if s.top_k == 0:
        return mlx_lm_sampler(temp=s.temperature, top_p=s.top_p, min_p=s.min_p)
    k, inv_t, top_p, min_p = s.top_k, 1.0 / s.temperature, s.top_p, s.min_p

    def sample(logprobs: mx.array) -> mx.array:
        x = logprobs * inv_t
        kk = min(k, x.shape[-1])
        idx = mx.argpartition(-x, kth=kk - 1, axis=-1)[:, :kk]
        v = mx.take_along_axis(x, idx, axis=-1)
        order = mx.argsort(-v, axis=-1)
        v, idx = mx.take_along_axis(v, order, axis=-1), mx.take_along_axis(idx, order, axis=-1)
        p = mx.softmax(v, axis=-1)
        keep = (mx.cumsum(p, axis=-1) - p) < top_p  # the smallest prefix reaching top_p
        if min_p > 0:
            keep = keep & (p >= min_p * p[:, :1])
        choice = mx.random.categorical(mx.where(keep, v, -mx.inf))
        return mx.take_along_axis(idx, choice[:, None], axis=-1)[:, 0]

    return sample


@dataclass
class Piece:
    """A streamed piece of text, marked as reasoning or answer."""

    text: str
    kind: Literal["reasoning", "answer"]


@dataclass
class GenerationResult:
    text: str
    reasoning: str
    finish_reason: Literal["stop", "length", "context", "interrupted"]
    prompt_tokens: int
    prefilled_tokens: int  # prompt tokens actually run (the rest came from a cache)
    generation_tokens: int
    prompt_tps: float
    generation_tps: float
    peak_memory_gb: float
    tokens: list[int] = field(default_factory=list, repr=False)


# ---------------------------------------------------------------------------------------------
# The engine: prefill a cache, then sample token by token.


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
        if end < n:
            mx.eval([c.state for c in cache])
            if on_stop is not None and end in stops:
                on_stop(end)
        start = end
    return lm.logits(h[:, -1])[0]


class ThinkingControl:
    """Ends reasoning gracefully: at the budget, or when it loops.

    It sees every sampled token before it is fed to the model and may replace
    it with the closing sentence. The cut waits for a word boundary (at most
    ``WORD_GRACE`` tokens), so no word is split.
    """

    def __init__(
        self, tokenizer, *, reasoning: bool, budget: Optional[int], special: SpecialTokens = SpecialTokens()
    ):
        self.tokenizer = tokenizer
        self.special = special
        self.reasoning = reasoning
        self.budget = budget
        self.count = 0  # reasoning tokens the model generated
        self.history: list[int] = []
        self.closing_reason: Optional[str] = None
        self._grace = 0
        self._prev_text = ""
        self._closing = None

    def closing_tokens(self) -> list[int]:
        if self._closing is None:
            self._closing = self.tokenizer.encode(CLOSING, add_special_tokens=False)
        return self._closing

    def observe(self, token: int) -> Optional[list[int]]:
        """Accept ``token`` (None) or return the tokens to feed instead."""
        if token == self.special.think_open:
            self.reasoning = True
            return None
        if not self.reasoning:
            return None
        if token == self.special.think_close or token in self.special.stop:
            self.reasoning = False
            return None
        text = self.tokenizer.decode([token])
        if self.closing_reason is None:
            if self.budget is not None and self.count >= self.budget:
                self.closing_reason = "budget"
            elif self.count % 8 == 0 and looping(self.history):
                self.closing_reason = "loop"
        if self.closing_reason is not None:
            if continues_word(self._prev_text, text) and self._grace < WORD_GRACE:
                self._grace += 1
            else:
                self.reasoning = False
                return self.closing_tokens()
        self.count += 1
        self.history.append(token)
        self._prev_text = text
        return None


def continues_word(before: str, after: str) -> bool:
    """Whether ``after`` would extend the word ``before`` ends with."""
    if not before or not after:
        return False
    a, b = before[-1], after[0]
    return a.isalnum() and b.isalnum() and not (_wide(a) or _wide(b))


def _wide(ch: str) -> bool:
    # CJK characters are words on their own.
    return unicodedata.east_asian_width(ch) in "WF"


def looping(tokens: Sequence[int], *, min_span: int = 64, max_period: int = 256, min_repeats: int = 3) -> bool:
    """Whether ``tokens`` end in a span repeated back to back: ≥ 3 copies covering ≥ 64 tokens."""
    n = len(tokens)
    if n < min_span:
        return False
    a = np.asarray(tokens[-min(n, max(min_span, max_period * min_repeats)) :])
    for p in range(1, max_period + 1):
        reps = max(min_repeats, -(-min_span // p))
        if reps * p > len(a):
            break
        tail = a[-reps * p :]
        if np.array_equal(tail[p:], tail[:-p]):
            return True
    return False


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
    model computes while the caller detokenizes. Forced tokens (the closing of
    reasoning) are fed as one chunk and yielded like sampled ones.
    """
    generated: list[int] = []

    def sample(logits):
        for p in processors:
            logits = p(mx.array(generated, dtype=mx.int32), logits[None])[0]
        return sampler((logits - mx.logsumexp(logits, keepdims=True))[None])[0]

    def step(tokens: list[int]) -> mx.array:
        return sample(model(mx.array(tokens)[None], cache=cache, rope_delta=rope_delta)[0, -1])

    y = sample(logits)
    mx.async_eval(y)
    while len(generated) < max_tokens:
        token = y.item()
        forced = control.observe(token)
        if forced is not None:
            forced = forced[: max_tokens - len(generated)]
            generated.extend(forced)
            y = step(forced)
            mx.async_eval(y)
            yield from forced
            continue
        generated.append(token)
        if token in stop or len(generated) == max_tokens:
            yield token
            return
        y = step([token])
        mx.async_eval(y)
        yield token


# ---------------------------------------------------------------------------------------------
# The public API.

Prompt = Union[str, Sequence[dict]]
VideoSource = Union[str, Path, Sequence[ImageSource]]


def messages_of(prompt: Prompt, system: Optional[str] = None, media: Sequence[Media] = ()) -> list[dict]:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise Qwen35Error("prompt: empty")
        messages = [{"role": "user", "content": user_content(prompt, media)}]
    else:
        messages = [dict(m) for m in prompt]
        if not messages:
            raise Qwen35Error("messages: empty")
    if system:
        messages.insert(0, {"role": "system", "content": system})
    return messages


class TextStream:
    """Turns generated token ids into :class:`Piece` objects and the final texts.

    Holds back text that could still become a user stop string.
    """

    def __init__(self, tokenizer, *, reasoning: bool, stop: Sequence[str] = ()):
        self.detok = tokenizer.detokenizer
        self.detok.reset()
        self.special = special_tokens(tokenizer)
        self.splitter = ReasoningSplitter(thinking_opened=reasoning)
        self.stop = [s for s in stop if s]
        self.parts = {"reasoning": [], "answer": []}
        self.stopped = False
        self._pending: list[Piece] = []

    def add(self, token: int) -> list[Piece]:
        if token in self.special.stop:
            return []
        self.detok.add_token(token)
        return self._route(self.splitter.feed(self.detok.last_segment))

    def finish(self) -> list[Piece]:
        self.detok.finalize()
        out = self._route(self.splitter.feed(self.detok.last_segment) + self.splitter.finish())
        # The held-back tail can no longer become a stop string; _route recorded the rest.
        rest, self._pending = self._pending, []
        for p in rest:
            self.parts[p.kind].append(p.text)
        return out + rest

    def _route(self, pieces) -> list[Piece]:
        """Queue new pieces; release those that can no longer start a stop string."""
        if self.stopped:
            return []
        self._pending += [Piece(text, kind) for kind, text in pieces]
        if not self.stop:
            out, self._pending = self._pending, []
        else:
            text = "".join(p.text for p in self._pending)
            hit = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
            if hit >= 0:
                self.stopped = True
                keep = hit
            else:
                longest = max(len(s) for s in self.stop) - 1
                keep = max(0, len(text) - longest)
            out = _take_chars(self._pending, keep)
            self._pending = [] if self.stopped else _drop_chars(self._pending, keep)
        for p in out:
            self.parts[p.kind].append(p.text)
        return out


def _take_chars(pieces: list[Piece], n: int) -> list[Piece]:
    out = []
    for p in pieces:
        if n <= 0:
            break
        out.append(Piece(p.text[:n], p.kind))
        n -= len(p.text)
    return [p for p in out if p.text]


def _drop_chars(pieces: list[Piece], n: int) -> list[Piece]:
    out = []
    for p in pieces:
        if n >= len(p.text):
            n -= len(p.text)
            continue
        out.append(Piece(p.text[n:], p.kind))
        n = 0
    return out


class Generation:
    """An iterator of :class:`Piece` objects; ``result`` is set once it is exhausted.

    Closing it early (or a KeyboardInterrupt in the consumer) ends generation
    with finish reason "interrupted".
    """

    def __init__(self, pieces: Iterator[Piece], holder: dict):
        self._pieces = pieces
        self._holder = holder

    def __iter__(self):
        return self

    def __next__(self) -> Piece:
        return next(self._pieces)

    def close(self):
        self._pieces.close()

    @property
    def result(self) -> Optional[GenerationResult]:
        return self._holder.get("result")

    @property
    def prompt_logits(self) -> Optional[mx.array]:
        """The next-token logits [vocab] at the end of the prompt, once prefilled."""
        return self._holder.get("prompt_logits")


def run(
    model,
    tokenizer,
    prompt_tokens: Sequence[int],
    cache: list[Any],
    *,
    reasoning: bool,
    sampling: Sampling,
    max_tokens: int,
    thinking_budget: Optional[int] = None,
    stop: Sequence[str] = (),
    seed: Optional[int] = None,
    start: int = 0,
    prefill_kwargs: Optional[dict] = None,
    rope_delta: int = 0,
) -> Generation:
    """Generate from ``prompt_tokens`` whose first ``start`` tokens ``cache`` already holds.

    ``reasoning``: the prompt leaves a ``<think>`` block open.
    """
    if max_tokens < 1:
        raise Qwen35Error(f"max_tokens: must be ≥ 1, got {max_tokens}")
    if thinking_budget is not None and thinking_budget < 0:
        raise Qwen35Error(f"thinking budget: must be ≥ 0, got {thinking_budget}")
    context = model.config.text.max_position_embeddings
    if len(prompt_tokens) >= context:
        raise Qwen35Error(f"prompt: {len(prompt_tokens)} tokens, longer than the model's context of {context}")
    holder: dict = {}
    return Generation(
        _run(
            holder, model, tokenizer, list(prompt_tokens), cache, reasoning, sampling, max_tokens,
            thinking_budget, stop, seed, start, prefill_kwargs or {}, rope_delta,
        ),
        holder,
    )


def _run(holder, model, tokenizer, prompt, cache, reasoning, sampling, max_tokens, budget, stop, seed, start,
         prefill_kwargs, rope_delta):
    if seed is not None:
        mx.random.seed(seed)
    sampler = make_sampler(sampling)
    processors = make_logits_processors(
        repetition_penalty=None if sampling.repetition_penalty == 1 else sampling.repetition_penalty,
        presence_penalty=sampling.presence_penalty or None,
        # Presence counts the whole answer, as the model card's OpenAI-style setting means.
        presence_context_size=max_tokens,
    )
    special = special_tokens(tokenizer)
    stream = TextStream(tokenizer, reasoning=reasoning, stop=stop)
    control = ThinkingControl(tokenizer, reasoning=reasoning, budget=budget, special=special)
    # The reply ends where the model's context does.
    limit = min(max_tokens, model.config.text.max_position_embeddings - len(prompt))
    mx.reset_peak_memory()
    tokens: list[int] = []
    finish = "length"
    t0 = time.perf_counter()
    t1 = None
    try:
        logits = prefill(model, prompt[start:], cache, rope_delta=rope_delta, **prefill_kwargs)
        mx.eval(logits)
        holder["prompt_logits"] = logits
        t1 = time.perf_counter()
        for token in decode_tokens(
            model, logits, cache, sampler=sampler, processors=processors, control=control,
            max_tokens=limit, rope_delta=rope_delta, stop=special.stop,
        ):
            tokens.append(token)
            yield from stream.add(token)
            if token in special.stop or stream.stopped:
                finish = "stop"
                break
        else:
            finish = "context" if limit < max_tokens else "length"
        yield from stream.finish()
    except (KeyboardInterrupt, GeneratorExit):
        finish = "interrupted"
        stream.finish()
        if t1 is None:
            t1 = time.perf_counter()
        raise
    finally:
        t2 = time.perf_counter()
        t1 = t1 or t2
        holder["result"] = GenerationResult(
            text="".join(stream.parts["answer"]),
            reasoning="".join(stream.parts["reasoning"]),
            finish_reason=finish,
            prompt_tokens=len(prompt),
            prefilled_tokens=len(prompt) - start,
            generation_tokens=len(tokens),
            prompt_tps=(len(prompt) - start) / max(t1 - t0, 1e-9),
            generation_tps=len(tokens) / max(t2 - t1, 1e-9),
            peak_memory_gb=mx.get_peak_memory() / 1e9,
            tokens=tokens,
        )


def stream_generate(
    model: Model,
    tokenizer: TokenizerWrapper,
    prompt: Prompt,
    *,
    think: bool = False,
    system: Optional[str] = None,
    max_tokens: int = 4096,
    sampling: Optional[Sampling] = None,
    thinking_budget: Optional[int] = None,
    stop: Sequence[str] = (),
    seed: Optional[int] = None,
    images: Sequence[ImageSource] = (),
    videos: Sequence[VideoSource] = (),
    kv_bits: Optional[int] = None,
) -> Generation:
    """Stream the reply to ``prompt`` (a user message, or a list of chat messages).

    The prompt is rendered with the checkpoint's chat template, thinking on
    or off. Iterate the returned :class:`Generation` for :class:`Piece`
    objects; its ``result`` holds the texts and statistics afterwards.
    ``sampling`` defaults to the model card's preset for the thinking mode.
    ``images`` (paths or PIL images) and ``videos`` (animations, folders of
    frames, or lists of images) join a string prompt before its text; a
    message list places ``{"type": "image"}`` items itself and passes the
    files here in the same order. ``kv_bits`` (4 or 8) quantizes the
    attention KV cache.
    """
    media = load_media(model, images, videos)
    text = render_text(tokenizer, messages_of(prompt, system, media), enable_thinking=think)
    inputs = prompt_inputs(model, tokenizer, tokenizer.encode(text, add_special_tokens=False), media)
    return run(
        model,
        tokenizer,
        inputs.ids,
        model.make_cache(kv_bits),
        reasoning=thinking_opened(text),
        sampling=sampling or default_sampling(think),
        max_tokens=max_tokens,
        thinking_budget=thinking_budget,
        stop=stop,
        seed=seed,
        prefill_kwargs={"input_embeddings": inputs.embeddings, "positions": inputs.positions},
        rope_delta=inputs.rope_delta,
    )


def generate(model: Model, tokenizer: TokenizerWrapper, prompt: Prompt, **options: Any) -> GenerationResult:
    """Generate the whole reply; ``options`` are :func:`stream_generate`'s keyword arguments."""
    gen = stream_generate(model, tokenizer, prompt, **options)
    for _ in gen:
        pass
    return gen.result


__all__ = [
    "GenerationResult",
    "Piece",
    "PRESETS",
    "Sampling",
    "generate",
    "preset",
    "stream_generate",
]
