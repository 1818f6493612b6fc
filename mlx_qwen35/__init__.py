"""Qwen3.5 running natively with MLX.

    import mlx_qwen35

    model, tokenizer = mlx_qwen35.load("Qwen/Qwen3.5-2B")
    print(mlx_qwen35.generate(model, tokenizer, "Hello!").text)

    for piece in mlx_qwen35.stream_generate(model, tokenizer, "Why is the sky blue?", think=True):
        print(piece.text, end="")  # piece.kind is "reasoning" or "answer"

    chat = mlx_qwen35.Chat(model, tokenizer, think=False)
    chat.ask("Name a prime number.")
    chat.ask("And the next one?")  # only the new tokens are prefilled

    def add(a: int, b: int) -> int:
        '''Add two numbers.

        Args:
            a: The first.
            b: The second.
        '''
        return a + b

    chat = mlx_qwen35.Chat(model, tokenizer, tools=[add])
    print(mlx_qwen35.ask_with_tools(chat, "What is 17 + 25?").text)  # the model calls add

The names below are imported on first use: MLX, mlx-lm and the tokenizer
take seconds to import, which ``import mlx_qwen35`` (and the command line's
``--help``) should not pay.
"""

from __future__ import annotations

import sys
import types
from importlib import import_module
from typing import TYPE_CHECKING

from .errors import Qwen35Error

if TYPE_CHECKING:
    from .chat import Chat
    from .convert import convert
    from .engine import Generation, GenerationResult
    from .generate import batch_generate, generate, stream_batch_generate, stream_generate
    from .loading import load
    from .quant import QuantSpec
    from .sampling import PRESETS, Sampling
    from .stream import Piece
    from .tool_loop import ask_with_tools
    from .tools import ToolCall, tool_schemas

_LAZY = {
    "load": "loading",
    "generate": "generate",
    "stream_generate": "generate",
    "batch_generate": "generate",
    "stream_batch_generate": "generate",
    "Sampling": "sampling",
    "PRESETS": "sampling",
    "Generation": "engine",
    "GenerationResult": "engine",
    "Piece": "stream",
    "ToolCall": "tools",
    "tool_schemas": "tools",
    "Chat": "chat",
    "ask_with_tools": "tool_loop",
    "convert": "convert",
    "QuantSpec": "quant",
}

__all__ = ["Qwen35Error", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'mlx_qwen35' has no attribute {name!r}")
    value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """Keeps ``mlx_qwen35.generate`` and ``mlx_qwen35.convert`` the functions.

    Importing a submodule binds its name on the package; for these two the
    name belongs to the function, whichever module imports them first.
    """

    def __setattr__(self, name, value):
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
