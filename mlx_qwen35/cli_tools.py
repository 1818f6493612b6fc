"""``--tools FILE.py`` for chat and generate: a Python file's own public functions as the model's tools.

Also how the calls and their results are shown (one dimmed line each) and
reported by ``generate --json``. Nothing here imports MLX.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import sys
from pathlib import Path
from typing import Any, Callable, Optional

from .errors import Qwen35Error

RESULT_CHARS = 300  # of a tool's result, shown on one line


def load_tools(path: Optional[Path]) -> Optional[list[Callable[..., Any]]]:
    """The public functions defined in the Python file ``path`` (not those it imports), in file order."""
    if path is None:
        return None
    where = f"--tools {path}"
    if not path.is_file():
        raise Qwen35Error(f"{where}: no such file (expected a Python file of functions)")
    name = f"mlx_qwen35_tools_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise Qwen35Error(f"{where}: not a Python file (expected a .py file of functions)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look their module up
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as e:  # the user's code: anything it raises is one line
        sys.modules.pop(name, None)
        raise Qwen35Error(f"{where}: importing it raised {type(e).__name__}: {e}") from None
    functions = [
        f
        for n, f in vars(module).items()
        if not n.startswith("_") and inspect.isfunction(f) and f.__module__ == name
    ]
    if not functions:
        raise Qwen35Error(f"{where}: defines no public functions (functions whose names do not start with _)")
    from .tools import schema_of

    for f in functions:  # a function without type hints or docstring fails now, not at the first turn
        schema_of(f, where)
    return functions


def call_line(call) -> str:
    """A call as one line: its function and arguments, and what is wrong if it is invalid."""
    line = f"→ {call.name or '?'} {json.dumps(call.arguments, ensure_ascii=False, default=str)}"
    return line if call.valid else f"{line} (invalid: {call.error})"


def result_line(text: str) -> str:
    flat = " ".join(text.split())
    return "← " + (flat if len(flat) <= RESULT_CHARS else flat[:RESULT_CHARS] + "…")


def call_json(call, result: Optional[str] = None) -> dict:
    """A call as ``generate --json`` reports it; ``result``: its function's result, if it ran."""
    out = {"name": call.name, "arguments": call.arguments, "valid": call.valid, "error": call.error}
    return out if result is None else out | {"result": result}
