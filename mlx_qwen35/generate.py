"""The one-shot API: ``stream_generate`` yields :class:`~mlx_qwen35.stream.Piece` objects
(text marked reasoning, answer or tool call) as tokens arrive; ``generate`` collects them into a
:class:`~mlx_qwen35.engine.GenerationResult`. Both render a user prompt (or a message list)
with the checkpoint's own chat template: a one-shot generation is a one-turn chat.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from mlx_lm.tokenizer_utils import TokenizerWrapper

from .engine import Generation, GenerationResult, run
from .model import Model
from .processor import ImageSource
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
    pieces, with finish reason "tool_calls"). The
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
    return run(model, tokenizer, turn.request, model.make_cache(s.kv_bits))


def generate(model: Model, tokenizer: TokenizerWrapper, prompt: Prompt, **options: Any) -> GenerationResult:
    """Generate the whole reply; ``options`` are :func:`stream_generate`'s keyword arguments."""
    gen = stream_generate(model, tokenizer, prompt, **options)
    for _ in gen:
        pass
    return gen.result


__all__ = ["generate", "stream_generate"]
