"""The one-shot API: ``stream_generate`` yields :class:`~mlx_qwen35.stream.Piece` objects
(text marked reasoning, answer or tool call) as tokens arrive; ``generate`` collects them into a
:class:`~mlx_qwen35.engine.GenerationResult`. Both render a user prompt (or a message list)
with the checkpoint's own chat template: a one-shot generation is a one-turn chat.
``batch_generate`` and ``stream_batch_generate`` do the same for many prompts at once.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import mlx.core as mx
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .batch import Batch, Event
from .engine import Generation, GenerationResult, run
from .errors import Qwen35Error
from .model import Model
from .processor import ImageSource
from .stream import Piece
from .turn import Prompt, Settings, VideoSource, prepare


def stream_generate(
    model: Model,
    tokenizer: TokenizerWrapper,
    prompt: Prompt,
    *,
    stop: Sequence[str] = (),
    images: Sequence[ImageSource] = (),
    videos: Sequence[VideoSource] = (),
    processors: Sequence[Callable] = (),
    **settings: Any,
) -> Generation:
    """Stream the reply to ``prompt`` (a user message, or a list of chat messages).

    ``settings`` are those of :class:`~mlx_qwen35.turn.Settings`: ``think``,
    ``system``, ``max_tokens`` (4096), ``sampling``, ``thinking_budget``,
    ``seed``, ``kv_bits`` (4 or 8 quantizes the attention KV cache) and
    ``tools`` (OpenAI function schemas or Python functions: the reply's
    calls come back as ``result.tool_calls``, streamed as "tool_call"
    pieces, with finish reason "tool_calls"), ``mtp`` and
    ``num_draft_tokens`` (speculative decoding with the model's MTP head,
    loaded with ``load(..., mtp=True)``: up to that many drafted tokens a
    step, verified at once; same output, ``result.draft_tokens`` and
    ``accepted_draft_tokens`` count them; ``draft_vocab`` N drafts from
    the first N token ids only, a cheaper head). The
    prompt is rendered with the checkpoint's chat template, thinking on or
    off. Iterate the returned :class:`Generation` for pieces; its ``result``
    holds the texts and statistics afterwards. ``sampling`` defaults to the
    model card's preset for the thinking mode. Generation ends early at any
    of the ``stop`` strings. ``images`` (paths or PIL images) and ``videos``
    (animations, folders of frames, or lists of images) join a string prompt
    before its text; a message list places ``{"type": "image"}`` items itself
    and passes the files here in the same order. ``processors`` are extra
    logits processors ``(tokens so far, logits) → logits``.
    """
    s = Settings(**settings)
    turn = prepare(model, tokenizer, s, prompt, images=images, videos=videos, stop=stop, processors=processors)
    return run(model, tokenizer, turn.request, model.make_cache(s.kv_bits, mtp=turn.request.draft_tokens > 0))


def generate(model: Model, tokenizer: TokenizerWrapper, prompt: Prompt, **options: Any) -> GenerationResult:
    """Generate the whole reply; ``options`` are :func:`stream_generate`'s keyword arguments."""
    gen = stream_generate(model, tokenizer, prompt, **options)
    for _ in gen:
        pass
    return gen.result


# ---------------------------------------------------------------------------------------------
# Many prompts at once (:mod:`.batch`): a list of prompts in, a result per prompt out.

ITEM_KEYS = ("prompt", "images", "videos", "stop")  # besides Settings' fields, less kv_bits and seed


class BatchGeneration:
    """An iterator of ``(index, piece)``: the pieces of every sequence, each tagged with its prompt's index.

    ``results[i]`` is set once sequence ``i`` ends (``on_result(i, result)``
    is called then). Closing it early ends the rest as "interrupted".
    """

    def __init__(self, batch: Batch, n: int, on_result: Optional[Callable[[int, GenerationResult], None]] = None):
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
            if e.exception is not None and not isinstance(e.exception, Qwen35Error):
                raise e.exception  # a bug, not bad input
            self.results[e.key] = e.result
            if self._on_result is not None:
                self._on_result(e.key, e.result)


def stream_batch_generate(
    model: Model,
    tokenizer: TokenizerWrapper,
    prompts: Sequence[Union[Prompt, dict]],
    *,
    seed: Optional[int] = None,
    max_rows: int = 32,
    on_result: Optional[Callable[[int, GenerationResult], None]] = None,
    **settings: Any,
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


def batch_generate(
    model: Model, tokenizer: TokenizerWrapper, prompts: Sequence[Union[Prompt, dict]], **options: Any
) -> list[GenerationResult]:
    """Generate the replies to ``prompts`` at once, one result per prompt, in order.

    ``options`` are :func:`stream_batch_generate`'s keyword arguments.
    """
    gen = stream_batch_generate(model, tokenizer, prompts, **options)
    for _ in gen:
        pass
    return gen.results


__all__ = ["generate", "stream_generate", "batch_generate", "stream_batch_generate"]
