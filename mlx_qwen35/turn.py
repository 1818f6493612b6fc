"""One turn, prepared the same way for a one-shot generation and for a chat.

:func:`prepare` loads the media, renders the messages with the checkpoint's
chat template and builds the model inputs; the :class:`Turn` it returns holds
the engine's :class:`~mlx_qwen35.engine.Request`. :class:`Settings` are what a
caller chooses for a turn (a :class:`~mlx_qwen35.chat.Chat` keeps them
between turns and in its saved sessions).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from .engine import Request
from .errors import Qwen35Error
from .media import Media, load_media, prompt_inputs, user_content
from .processor import ImageSource
from .ops.dispatch import drafting_pays
from .reasoning import thinking_opened
from .sampling import Sampling, default_sampling
from .tokenizer import render_text
from .tools import Tool, tool_schemas

Prompt = Union[str, Sequence[dict]]
VideoSource = Union[str, Path, Sequence[ImageSource]]
_INT = (int, type(None))


def _setting(default, kinds, expected: str):
    """A setting's default, and what a saved session must hold for it (JSON types, and words for the error)."""
    return field(default=default, metadata={"json": (kinds, expected)})


@dataclass(kw_only=True, eq=False)  # a Chat is one: it compares by identity
class Settings:
    """What a turn is generated with; ``sampling`` None means the model card's preset for ``think``."""

    system: Optional[str] = _setting(None, (str, type(None)), "text or null")  # the system prompt
    think: bool = _setting(False, bool, "true or false")
    thinking_budget: Optional[int] = _setting(None, _INT, "a number of tokens or null")
    sampling: Optional[Sampling] = _setting(None, (dict, type(None)), "an object or null")
    max_tokens: int = _setting(4096, int, "a number of tokens")
    kv_bits: Optional[int] = _setting(None, _INT, "4, 8 or null")  # quantizes the attention KV cache
    seed: Optional[int] = _setting(None, _INT, "an integer or null")
    # OpenAI function schemas or Python functions the model may call
    tools: Optional[list[Tool]] = _setting(None, (list, type(None)), "a list of function schemas or null")
    # speculative decoding with the MTP head; None: where it pays (drafting_pays)
    mtp: Optional[bool] = _setting(None, (bool, type(None)), "true, false or null")
    num_draft_tokens: int = _setting(2, int, "a number of tokens")  # the most drafted a step (fewer while they miss)
    draft_vocab: Optional[int] = _setting(None, _INT, "a number of tokens or null")  # drafts from the first N ids only


@dataclass
class Turn:
    messages: list[dict]  # all of the prompt's messages, as rendered
    media: list[Media]  # the images and videos this turn adds
    request: Request


def messages_of(prompt: Prompt, media: Sequence[Media] = ()) -> list[dict]:
    """``prompt`` as messages: a string is a user message, with ``media`` before its text."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise Qwen35Error("prompt: empty")
        return [{"role": "user", "content": user_content(prompt, media)}]
    messages = [dict(m) for m in prompt]
    if not messages:
        raise Qwen35Error("messages: empty")
    return messages


def draft_tokens(model, settings: Settings) -> int:
    """The most tokens the MTP head drafts a step under ``settings``: 0 decodes plainly."""
    if settings.mtp and not model.has_mtp:
        raise Qwen35Error("mtp: this model has no MTP head (the checkpoint has none, or it was loaded with mtp=False)")
    on = settings.mtp if settings.mtp is not None else model.has_mtp and drafting_pays()
    return settings.num_draft_tokens if on else 0


def prepare(
    model,
    tokenizer,
    settings: Settings,
    prompt: Prompt,
    *,
    images: Sequence[ImageSource] = (),
    videos: Sequence[VideoSource] = (),
    stop: Sequence[str] = (),
    history: Sequence[dict] = (),
    history_media: Sequence[Media] = (),
    processors: Sequence[Callable] = (),
) -> Turn:
    """Load media → render the system prompt, ``history`` and ``prompt`` (and the tools) → the model's inputs.

    ``history_media`` are the media placed in ``history``, in order.
    ``processors`` are extra logits processors ``(tokens, logits) → logits``.
    """
    schemas = tool_schemas(settings.tools)
    media = load_media(model, images, videos)
    system = [{"role": "system", "content": settings.system}] if settings.system else []
    messages = [*system, *history, *messages_of(prompt, media)]
    text = render_text(tokenizer, messages, enable_thinking=settings.think, tools=schemas or None)
    inputs = prompt_inputs(
        model, tokenizer, tokenizer.encode(text, add_special_tokens=False), [*history_media, *media]
    )
    request = Request(
        inputs,
        reasoning=thinking_opened(text),
        sampling=settings.sampling or default_sampling(settings.think),
        max_tokens=settings.max_tokens,
        thinking_budget=settings.thinking_budget,
        stop=stop,
        seed=settings.seed,
        tools=schemas,
        processors=tuple(processors),
        draft_tokens=draft_tokens(model, settings),
        draft_vocab=settings.draft_vocab,
    )
    return Turn(messages, media, request)
