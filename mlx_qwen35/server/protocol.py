"""The OpenAI chat-completions request, checked field by field, and the responses and chunks built for it.

:func:`parse_chat` turns the request JSON into :class:`ChatParams` (messages
and images, the turn's settings, stop strings, tools); a bad field raises an
:class:`ApiError` whose one line names it. Fields that cannot change the
answer (``user``, ``metadata``, ``store``…) and unknown ones are ignored;
fields we understand but cannot honour (``n`` > 1, ``logprobs``,
``frequency_penalty``, a ``response_format`` other than text…) are refused.
:class:`Reply` turns the streamed pieces into deltas and the final message, so
a streamed answer and a whole one are built by the same code.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Optional

from PIL import Image

from ..errors import Qwen35Error
from ..sampling import Sampling, default_sampling
from .messages import ApiError, bad, check_utf8, parse_messages, shown

__all__ = ["ApiError", "ChatParams", "Reply", "parse_chat", "parse_json"]

TOOL_CHOICES = ("auto", "none")
FINISH = {"stop": "stop", "length": "length", "context": "length", "tool_calls": "tool_calls"}


@dataclass
class ChatParams:
    model: str
    messages: list[dict]
    images: list[Image.Image]
    settings: dict  # Settings fields: think, thinking_budget, sampling, seed
    max_tokens: Optional[int]  # None: up to the context
    stop: list[str]
    tools: list[dict]
    tool_choice: str
    stream: bool
    include_usage: bool


def parse_json(body: bytes) -> dict:
    try:
        value = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"request body: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ApiError(400, f"request body: expected a JSON object, got {shown(value)}")
    check_utf8("request body", value)
    return value


def _typed(body: dict, name: str, kinds: tuple, expected: str, default=None):
    """``body[name]`` if present and not null, checked against ``kinds`` (a bool is no number)."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise bad(name, f"expected {expected}, got {shown(value)}")
    return value


def _integer(body: dict, name: str, low: int, expected: str) -> Optional[int]:
    value = _typed(body, name, (int,), expected)
    if value is not None and value < low:
        raise bad(name, f"expected {expected}, got {value}")
    return value


def _refuse_unless(body: dict, name: str, allowed, message: str) -> None:
    if name in body and body[name] not in allowed:
        raise bad(name, f"{message}, got {shown(body[name])}")


def parse_chat(body: dict, model_id: str, allow_files: Optional[Path] = None) -> ChatParams:
    """Check a ``/v1/chat/completions`` request; the first bad field raises :class:`ApiError`."""
    model = _typed(body, "model", (str,), "the model's id", model_id)
    if model != model_id:
        raise ApiError(404, f"model: {model!r} is not served here; this server serves {model_id!r}",
                       param="model", code="model_not_found")
    _refuse_unless(body, "n", (None, 1), "only 1 choice is supported")
    _refuse_unless(body, "logprobs", (None, False), "log probabilities are not supported")
    _refuse_unless(body, "top_logprobs", (None, 0), "log probabilities are not supported")
    _refuse_unless(body, "frequency_penalty", (None, 0), "not supported; use presence_penalty or repetition_penalty")
    _refuse_unless(body, "logit_bias", (None, {}), "not supported")
    _refuse_unless(body, "response_format", (None, {"type": "text"}), 'only {"type": "text"} is supported')
    messages, images = parse_messages(body.get("messages"), allow_files)

    kwargs = _typed(body, "chat_template_kwargs", (dict,), 'an object like {"enable_thinking": true}', {})
    for key in kwargs:
        if key != "enable_thinking":
            raise bad(f"chat_template_kwargs.{key}", "not supported (only enable_thinking is)")
    think = kwargs.get("enable_thinking", False)
    if not isinstance(think, bool):
        raise bad("chat_template_kwargs.enable_thinking", f"expected true or false, got {shown(think)}")
    settings = {
        "think": think,
        "thinking_budget": _integer(body, "thinking_budget", 0, "a number of tokens ≥ 0"),
        "sampling": _sampling(body, think),
        "seed": _integer(body, "seed", 0, "an integer ≥ 0"),
    }
    if settings["seed"] is not None and settings["seed"] >= 2**64:
        raise bad("seed", f"expected an integer below 2**64, got {settings['seed']}")
    legacy = _integer(body, "max_tokens", 1, "a number of tokens ≥ 1")
    max_tokens = _integer(body, "max_completion_tokens", 1, "a number of tokens ≥ 1") or legacy

    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else [] if stop is None else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise bad("stop", f"expected text or a list of texts, got {shown(body['stop'])}")
    stream = _typed(body, "stream", (bool,), "true or false", False)
    options = _typed(body, "stream_options", (dict,), 'an object like {"include_usage": true}', {})
    include_usage = options.get("include_usage") or False
    if not isinstance(include_usage, bool):
        raise bad("stream_options.include_usage", f"expected true or false, got {shown(include_usage)}")

    tools = _typed(body, "tools", (list,), "a list of tools", [])
    tool_choice = _typed(body, "tool_choice", (str,), '"auto" or "none"', "auto")
    if tool_choice not in TOOL_CHOICES:
        raise bad("tool_choice", f'expected "auto" or "none", got {shown(body["tool_choice"])}')
    return ChatParams(model, messages, images, settings, max_tokens, stop, tools, tool_choice, stream, include_usage)


def _sampling(body: dict, think: bool) -> Sampling:
    """The model card's preset for the thinking mode, with the request's sampling fields over it."""
    overrides = {}
    for f in fields(Sampling):
        kinds, expected = ((int,), "an integer") if f.name == "top_k" else ((int, float), "a number")
        value = _typed(body, f.name, kinds, expected)
        if value is not None:
            overrides[f.name] = 0 if f.name == "top_k" and value == -1 else value  # vLLM's -1: no top-k
    try:
        return replace(default_sampling(think), **overrides)
    except Qwen35Error as e:
        raise ApiError.from_error(e) from None


# ---------------------------------------------------------------------------------------------
# Responses


def usage(prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


class Reply:
    """One completion's identity, and its message as the pieces arrive."""

    def __init__(self, id: str, model: str):
        self.id, self.model, self.created = id, model, int(time.time())
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.tool_calls: list[dict] = []

    def add(self, piece) -> Optional[dict]:
        """The delta ``piece`` adds to the message (None: nothing to show)."""
        if not piece.text:
            return None
        if piece.kind == "reasoning":
            self.reasoning.append(piece.text)
            return {"reasoning_content": piece.text}
        self.content.append(piece.text)
        return {"content": piece.text}

    def finish_reason(self, result) -> str:
        return FINISH.get(result.finish_reason, "stop")

    def chunk(self, delta: dict, finish_reason: Optional[str] = None) -> dict:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return self._object("chat.completion.chunk", choices=[choice])

    def usage_chunk(self, usage: dict) -> dict:
        return self._object("chat.completion.chunk", choices=[], usage=usage)

    def completion(self, result, usage: dict) -> dict:
        message = {
            "role": "assistant",
            "content": "".join(self.content) or (None if self.tool_calls else ""),
            "reasoning_content": "".join(self.reasoning) or None,
        }
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": self.finish_reason(result)}
        return self._object("chat.completion", choices=[choice], usage=usage)

    def _object(self, kind: str, **fields) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, **fields}
