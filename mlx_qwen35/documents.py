"""Text read into a message (a file, or stdin), never more than the model's context can hold."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from .errors import Qwen35Error

# The longest token of the Qwen3.5 vocabulary, in bytes: text longer than this × the context cannot fit it.
MAX_TOKEN_BYTES = 128


def read_limited(name: str, stream, context: Optional[int]) -> bytes:
    """``stream``'s bytes; a :class:`Qwen35Error` once there are more than a ``context``-token prompt can hold."""
    if context is None:
        return stream.read()
    limit = MAX_TOKEN_BYTES * context
    data = stream.read(limit + 1)  # never more: a device or an endless pipe would fill the memory
    if len(data) > limit:
        raise Qwen35Error(
            f"{name}: over {limit:,} bytes, more than the model's context of {context:,} tokens can hold "
            "(reading stopped there)"
        )
    return data


def read_document(path, context: Optional[int] = None) -> str:
    """The text of a UTF-8 file, or a :class:`Qwen35Error` saying why it cannot be used.

    With ``context`` (the model's, in tokens), reading stops at what such a prompt can hold.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise Qwen35Error(f"{p}: no such file")
    if p.is_dir():
        raise Qwen35Error(f"{p}: is a folder, not a text file")
    try:
        with open(p, "rb") as f:
            data = read_limited(str(p), f, context)
    except OSError as e:
        raise Qwen35Error(f"{p}: cannot be read ({e.strerror})") from None
    if b"\0" not in data:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            pass
    raise Qwen35Error(f"{p}: not a text file (binary, or not UTF-8)")


def document_message(path, message: str = "", context: Optional[int] = None) -> str:
    """A user message carrying a text file's contents, then ``message`` (``context``: see :func:`read_document`)."""
    text = read_document(path, context).strip("\n")
    if not text.strip():
        raise Qwen35Error(f"{Path(path).expanduser()}: empty")
    return f"File {Path(path).name}:\n\n{text}" + (f"\n\n{message}" if message.strip() else "")


def read_stdin(context: int) -> str:
    """The message piped in, read no further than a ``context``-token prompt can hold."""
    data = read_limited("stdin", sys.stdin.buffer, context)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Qwen35Error(f"stdin: not valid UTF-8 (byte {e.start})") from None
