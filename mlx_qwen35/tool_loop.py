"""Python functions as the model's tools: run the calls of each reply and send back their results, until it answers.

:func:`ask_with_tools` does the whole loop and returns the final reply;
:func:`tool_rounds` yields each generation to stream (the REPL shows them).
"""

from __future__ import annotations

import json
from typing import Any, Callable, Iterator, Mapping, Sequence

from .engine import Generation, GenerationResult
from .tools import ToolCall, tool_functions

MAX_STEPS = 8


def call_tool(call: ToolCall, functions: Mapping[str, Callable[..., Any]]) -> str:
    """The text result of one call: what its function returns (text, else JSON), or what went wrong.

    An invalid call, or a function that raises, gives a result starting
    "error:" for the model to read; nothing is raised.
    """
    if not call.valid:
        return f"error: invalid call: {call.error}"
    function = functions.get(call.name)
    if function is None:
        return f"error: no Python function is bound to the tool {call.name!r}"
    try:
        value = function(**call.arguments)
    except Exception as e:  # the model reads what failed, and may try again
        return f"error: {type(e).__name__}: {e}"
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)


def tool_rounds(chat, gen: Generation, *, max_steps: int = MAX_STEPS, **options) -> Iterator[tuple[list, Generation]]:
    """Yield ``([], gen)``, then after each reply that ends in tool calls ``(results, next generation)``.

    Iterate each generation before taking the next. The calls run as the
    chat's Python functions (``chat.tools``); ``results`` pairs each
    :class:`ToolCall` with its result text, which ``chat.send_tool_results``
    sends (with ``options``). At most ``max_steps`` rounds of results are sent.
    """
    functions = tool_functions(chat.tools)
    results: list[tuple[ToolCall, str]] = []
    for step in range(max_steps + 1):
        yield results, gen
        r = gen.result
        if r is None or r.finish_reason != "tool_calls" or step == max_steps:
            return
        results = [(call, call_tool(call, functions)) for call in r.tool_calls]
        gen = chat.send_tool_results([text for _, text in results], **options)


def ask_with_tools(
    chat,
    content: str,
    *,
    max_steps: int = MAX_STEPS,
    images: Sequence = (),
    videos: Sequence = (),
    stop: Sequence[str] = (),
    processors: Sequence[Callable] = (),
) -> GenerationResult:
    """Send a message and answer the model's tool calls with ``chat.tools``' Python functions; return the final reply.

    Stops after ``max_steps`` rounds of tool results: the reply returned then
    may still end in tool calls (finish reason "tool_calls").
    """
    first = chat.send(content, images=images, videos=videos, stop=stop, processors=processors)
    for _, gen in tool_rounds(chat, first, max_steps=max_steps, stop=stop, processors=processors):
        for _ in gen:
            pass
    return gen.result
