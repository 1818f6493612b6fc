"""OpenAI chat messages → the messages the chat template renders, and the images they hold.

Each message is checked field by field; the first bad one raises an
:class:`ApiError` (400) naming it, e.g. ``messages[2].role: expected one of
system, user, assistant, tool``. Images arrive as ``image_url`` parts holding
``data:`` URLs, or local paths (``file://`` or plain) under the one folder the
server was started with ``--allow-files``; nothing is fetched from the network.
"""

from __future__ import annotations

import base64
import binascii
import json
from io import BytesIO
from pathlib import Path
from typing import Any, Optional
from urllib.parse import unquote

from PIL import Image, UnidentifiedImageError

from ..errors import Qwen35Error
from ..processor import load_image, prepare_image

ROLES = ("system", "user", "assistant", "tool")


class ApiError(Exception):
    """An error answered as OpenAI does: ``{"error": {"message", "type", "param", "code"}}``."""

    TYPES = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error", 503: "server_error"}

    def __init__(self, status: int, message: str, *, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @classmethod
    def from_error(cls, e: Qwen35Error) -> "ApiError":
        """Bad input found below the server: its message starts with the name at fault."""
        message = str(e)
        head = message.split(":", 1)[0]
        return cls(400, message, param=head if head and " " not in head else None)

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def bad(field: str, message: str) -> ApiError:
    return ApiError(400, f"{field}: {message}", param=field)


def check_utf8(field: str, value: Any) -> None:
    """JSON's escapes can spell lone surrogates, which no tokenizer can encode."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise bad(field, "holds a lone surrogate (\\ud800-\\udfff): not valid Unicode text") from None


def shown(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def parse_messages(value: Any, allow_files: Optional[Path]) -> tuple[list[dict], list[Image.Image]]:
    """The template's messages and the images of their ``image_url`` parts, in order."""
    if not isinstance(value, list) or not value:
        raise bad("messages", f"expected a non-empty list of messages, got {shown(value)}")
    messages, images = [], []
    for i, m in enumerate(value):
        field = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(field, f"expected an object with role and content, got {shown(m)}")
        role = m.get("role")
        if role not in ROLES:
            raise bad(f"{field}.role", f"expected one of {', '.join(ROLES)}, got {shown(role)}")
        out = {"role": role, "content": _content(m.get("content"), f"{field}.content", role, images, allow_files)}
        if role == "assistant":
            calls = m.get("tool_calls")
            if calls is not None:
                out["tool_calls"] = _tool_calls(calls, f"{field}.tool_calls")
            reasoning = m.get("reasoning_content")
            if reasoning is not None:
                if not isinstance(reasoning, str):
                    raise bad(f"{field}.reasoning_content", f"expected text, got {shown(reasoning)}")
                out["reasoning_content"] = reasoning
            if out["content"] is None and not out.get("tool_calls"):
                raise bad(f"{field}.content", "null, and the message has no tool_calls")
        elif out["content"] is None:
            raise bad(f"{field}.content", f"expected text or a list of content parts, got null")
        messages.append(out)
    return messages, images


def _content(value: Any, field: str, role: str, images: list, allow_files: Optional[Path]):
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise bad(field, f"expected text or a list of content parts, got {shown(value)}")
    parts = []
    for j, part in enumerate(value):
        where = f"{field}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise bad(f"{where}.text", f"expected text, got {shown(part.get('text'))}")
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            if role != "user":
                raise bad(where, f"images are allowed only in user messages, not in a {role} message")
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else None
            if not isinstance(url, str):
                raise bad(f"{where}.image_url", 'expected {"url": "data:image/...;base64,..."}')
            images.append(_image(url, f"{where}.image_url.url", allow_files))
            parts.append({"type": "image"})
        else:
            raise bad(f"{where}.type", f"expected text or image_url, got {shown(kind)}")
    return parts


def _image(url: str, field: str, allow_files: Optional[Path]) -> Image.Image:
    """A decoded RGB image from a ``data:`` URL or an allowed local path."""
    try:
        if url.startswith("data:"):
            return prepare_image(_open_data_url(url, field), field)
        if "://" in url and not url.startswith("file://"):
            raise bad(field, "only data: URLs are accepted (the server fetches nothing from the network)")
        if allow_files is None:
            raise bad(field, "local files are refused; start the server with --allow-files DIR to read those under DIR")
        path = Path(unquote(url.removeprefix("file://"))).expanduser().resolve()
        if not path.is_relative_to(allow_files.resolve()):
            raise bad(field, f"{path} is outside the folder the server may read ({allow_files})")
        return load_image(path)
    except Qwen35Error as e:
        raise bad(field, str(e).removeprefix(f"{field}: ")) from None


def _open_data_url(url: str, field: str) -> Image.Image:
    header, comma, data = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise bad(field, "expected a base64 data URL (data:image/png;base64,...)")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise bad(field, "the data URL's payload is not valid base64") from None
    try:
        return Image.open(BytesIO(raw))
    except UnidentifiedImageError:
        raise bad(field, "not an image Pillow can read") from None
    except (Image.DecompressionBombError, OSError) as e:
        raise bad(field, f"unreadable image ({e})") from None


def _tool_calls(value: Any, field: str) -> list[dict]:
    """Past calls, with their arguments as dicts: the template iterates ``arguments|items``."""
    if not isinstance(value, list):
        raise bad(field, f"expected a list of tool calls, got {shown(value)}")
    calls = []
    for j, call in enumerate(value):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise bad(f"{field}[{j}].function", 'expected {"name": ..., "arguments": "{...}"}')
        args = fn.get("arguments", "{}")
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError as e:
                raise bad(f"{field}[{j}].function.arguments", f"not valid JSON ({e})") from None
        if not isinstance(args, dict):
            raise bad(f"{field}[{j}].function.arguments", f"expected a JSON object, got {shown(args)}")
        check_utf8(f"{field}[{j}].function.arguments", args)
        out = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
        if isinstance(call.get("id"), str):
            out["id"] = call["id"]
        calls.append(out)
    return calls
