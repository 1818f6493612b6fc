"""Tools the model may call: their schemas, and the calls it writes in the chat template's format.

Tools are given as OpenAI function schemas or as Python functions (described by
their signature, type hints and docstring). The model calls one by writing::

    <tool_call>
    <function=NAME>
    <parameter=P>
    value
    </parameter>
    </function>
    </tool_call>

:class:`ToolCallSplitter` takes such calls out of streamed answer text, and
:func:`parse_call` turns each into a :class:`ToolCall` whose arguments are typed
per the function's schema. A malformed call comes back invalid, with its raw
text and what is wrong with it; parsing never raises.
"""

from __future__ import annotations

import json
import math
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal, Optional, Sequence, Union

from mlx_lm.tool_parsers.qwen3_coder import parse_tool_call

from .errors import Qwen35Error

Tool = Union[dict, Callable[..., Any]]
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_FUNCTION_NAME = re.compile(r"<function=([^\s<>]+)>")


def tool_schemas(tools: Optional[Iterable[Tool]]) -> list[dict]:
    """``tools`` as OpenAI function schemas ``{"type": "function", "function": {name, description, parameters}}``.

    Each item is such a schema (checked) or a Python function, whose schema
    comes from its signature, type hints and docstring.
    """
    if tools is None:
        return []
    if isinstance(tools, (str, dict)) or not isinstance(tools, Iterable):
        raise Qwen35Error(f"tools: expected a list of function schemas or Python functions, got {tools!r:.80}")
    schemas, names = [], set()
    for i, tool in enumerate(tools):
        schema = schema_of(tool, f"tools[{i}]")
        name = schema["function"]["name"]
        if name in names:
            raise Qwen35Error(f"tools[{i}]: a second tool named {name!r}")
        names.add(name)
        schemas.append(schema)
    return schemas


def schema_of(tool: Tool, where: str) -> dict:
    """One tool's schema (see :func:`tool_schemas`); errors name it as ``where``."""
    if callable(tool):
        from transformers.utils import get_json_schema  # slow to import; only functions need it

        try:
            schema = get_json_schema(tool)
        except Exception as e:  # transformers' own errors say what the function lacks
            raise Qwen35Error(f"{where}: cannot describe {getattr(tool, '__name__', tool)!r} as a tool: {e}") from None
        schema["function"].pop("return", None)
        return schema
    expected = 'an OpenAI function schema {"type": "function", "function": {"name": ..., "parameters": {...}}}'
    function = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(function, dict) or tool.get("type", "function") != "function":
        got = json.dumps(tool, default=repr)[:80]
        raise Qwen35Error(f"{where}: expected {expected} or a Python function, got {got}")
    name = function.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[^\s<>]+", name):
        raise Qwen35Error(f"{where}.function.name: expected a name without spaces or <>, got {name!r}")
    params = function.get("parameters", {})
    if not isinstance(params, dict) or not isinstance(params.get("properties", {}), dict):
        raise Qwen35Error(f"{where}.function.parameters: expected a JSON schema object with 'properties'")
    for p, prop in params.get("properties", {}).items():
        if not isinstance(prop, dict):
            raise Qwen35Error(f"{where}.function.parameters.properties.{p}: expected a JSON schema object")
    try:
        return json.loads(json.dumps(tool))  # a plain JSON copy the caller cannot change under us
    except (TypeError, ValueError) as e:
        raise Qwen35Error(f"{where}: not JSON ({e})") from None


def tool_functions(tools: Optional[Iterable[Tool]]) -> dict[str, Callable[..., Any]]:
    """The Python functions among ``tools``, by their tool name."""
    return {s["function"]["name"]: t for t, s in zip(tools or (), tool_schemas(tools)) if callable(t)}


@dataclass
class ToolCall:
    """One call the model wrote: ``error`` None means it is valid (a known function, typed arguments)."""

    name: str
    arguments: dict
    raw: str  # the text inside <tool_call>…</tool_call> (to the end, if left open)
    error: Optional[str] = None
    id: str = field(default_factory=lambda: "call_" + secrets.token_hex(12))

    @property
    def valid(self) -> bool:
        return self.error is None

    def as_message(self) -> dict:
        """The OpenAI ``tool_calls`` item of an assistant message (arguments a dict, as the template reads them)."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def parse_call(raw: str, schemas: Sequence[dict], *, closed: bool = True) -> ToolCall:
    """The call written inside one ``<tool_call>`` block; ``closed`` False: the reply ended inside it."""
    if not closed:
        name = _FUNCTION_NAME.search(raw)
        return ToolCall(name.group(1) if name else "", {}, raw, "left open: the reply ended before </tool_call>")
    if raw.count("<function=") != 1:
        return ToolCall("", {}, raw, "expected one <function=NAME>…</function> inside <tool_call>")
    try:
        # mlx-lm reads the markup; its typing is lenient (a boolean "yes" is False), so values are typed here.
        parsed = parse_tool_call(raw.strip())
    except Exception:
        return ToolCall("", {}, raw, "expected <function=NAME>…</function> inside <tool_call>")
    name, args = parsed["name"], parsed["arguments"]
    functions = {s["function"]["name"]: s["function"] for s in schemas}
    if name not in functions:
        return ToolCall(name, args, raw, f"unknown function {name!r} (the tools are {', '.join(functions)})")
    params = functions[name].get("parameters", {})
    props = params.get("properties", {})
    errors, typed = [], {}
    for p, text in args.items():
        if p not in props:
            errors.append(f"unknown parameter {p!r}")
            typed[p] = text
            continue
        try:
            typed[p] = _typed("null" if text is None else text, props[p])  # mlx-lm reads a bare null as None
        except ValueError as e:
            errors.append(f"parameter {p!r}: expected {e}, got {text!r:.60}")
            typed[p] = text
    errors += [f"missing required parameter {p!r}" for p in params.get("required", ()) if p not in args]
    return ToolCall(name, typed, raw, "; ".join(errors) or None)


def _typed(text: str, prop: dict) -> Any:
    """``text`` as the JSON schema ``prop`` types it; ValueError(what was expected) when it does not parse."""
    kinds = prop.get("type")
    kinds = [kinds] if isinstance(kinds, str) else list(kinds or [])
    if prop.get("nullable") is True:
        kinds.append("null")
    known = [k for k in kinds if k in _CONVERT]
    if not known:  # no type (or none of JSON's): a JSON value if it is one, else the text
        value = _json(text, lambda v: True, text)
    else:
        # Text can always be a string: try that last, so "5" for ["integer", "string"] is 5.
        for kind in sorted(known, key=lambda k: k == "string"):
            value = _CONVERT[kind](text)
            if value is not _NO:
                break
        else:
            raise ValueError(" or ".join(_WORDS[k] for k in known))
    if "enum" in prop and value not in prop["enum"]:
        raise ValueError("one of " + ", ".join(json.dumps(v) for v in prop["enum"]))
    return value


_NO = object()


def _json(text: str, accept: Callable[[Any], bool], otherwise: Any = _NO) -> Any:
    try:
        value = json.loads(text, strict=False)  # strict=False: raw newlines inside strings
    except (ValueError, RecursionError):
        return otherwise
    return value if accept(value) else otherwise


def _is_number(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) or isinstance(v, float) and math.isfinite(v)


def _integer(text: str) -> Any:
    v = _json(text, _is_number)
    if isinstance(v, float):
        return int(v) if v.is_integer() else _NO  # 1e3 is 1000
    return v


def _word(words: dict) -> Callable[[str], Any]:
    return lambda text: words.get(text.strip().lower(), _NO)


_CONVERT: dict[str, Callable[[str], Any]] = {
    "string": lambda text: text,
    "integer": _integer,
    "number": lambda text: _json(text, _is_number),
    # The template writes Python values with |string: True, False, None.
    "boolean": _word({"true": True, "false": False}),
    "null": _word({"null": None, "none": None}),
    "object": lambda text: _json(text, lambda v: isinstance(v, dict)),
    "array": lambda text: _json(text, lambda v: isinstance(v, list)),
}
_WORDS = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "null": "null",
    "object": "a JSON object",
    "array": "a JSON array",
}

def result_messages(calls: Sequence[dict], results: Sequence) -> list[dict]:
    """The ``tool`` messages answering ``calls`` (an assistant message's ``tool_calls``): one result per call, in order.

    A result is text (anything else is sent as JSON), or a dict with
    ``content`` and optionally ``tool_call_id`` or ``name``, which must be the call's.
    """
    if isinstance(results, (str, dict)) or not isinstance(results, Sequence):
        raise Qwen35Error(f"tool results: expected a list, one result per call, got {results!r:.60}")
    if not calls:
        raise Qwen35Error("tool results: the last reply called no tools")
    if len(results) != len(calls):
        raise Qwen35Error(f"tool results: {len(results)} given for the last reply's {len(calls)} calls")
    out = []
    for i, (call, result) in enumerate(zip(calls, results)):
        ids = {"tool_call_id": call["id"], "name": call["function"]["name"]}
        content = result
        if isinstance(result, dict):
            if "content" not in result:
                raise Qwen35Error(f"tool results[{i}]: expected 'content' (and optionally 'tool_call_id' or 'name')")
            for key, expected in ids.items():
                if key in result and result[key] != expected:
                    raise Qwen35Error(f"tool results[{i}].{key}: {result[key]!r}, but the call's is {expected!r}")
            content = result["content"]
        if not isinstance(content, str):
            content = json.dumps(content, ensure_ascii=False, default=str)
        out.append({"role": "tool", **ids, "content": content})
    return out


Kind = Literal["answer", "tool_call"]


class ToolCallSplitter:
    """Feed answer text, get ``(kind, text, call)`` pieces: calls' markup is kind "tool_call", the rest "answer".

    The piece that closes a call carries its :class:`ToolCall` (else None).
    Text that could still start ``<tool_call>`` is held back, so no markup
    reaches an answer piece; whitespace right before a call, and after one
    that ends the reply, is dropped. Call :meth:`finish` after the last piece:
    a call still open there comes back invalid.
    """

    def __init__(self, schemas: Sequence[dict]):
        self.schemas = schemas
        self._held = ""
        self._raw: Optional[str] = None  # inside a call: its text so far
        self._after_call = False  # no answer text since the last call

    def feed(self, text: str) -> list[tuple[Kind, str, Optional[ToolCall]]]:
        out: list = []
        buf, self._held = self._held + text, ""
        while True:
            if self._raw is None:
                i = buf.find(CALL_OPEN)
                if i < 0:
                    break
                self._answer(out, buf[:i].rstrip())
                out.append(("tool_call", CALL_OPEN, None))
                self._raw, buf = "", buf[i + len(CALL_OPEN) :]
            else:
                i = buf.find(CALL_CLOSE)
                if i < 0:
                    break
                call = parse_call(self._raw + buf[:i], self.schemas)
                out.append(("tool_call", buf[:i] + CALL_CLOSE, call))
                self._raw, self._after_call, buf = None, True, buf[i + len(CALL_CLOSE) :]
        tag = CALL_OPEN if self._raw is None else CALL_CLOSE
        partial = next((n for n in range(min(len(tag) - 1, len(buf)), 0, -1) if buf.endswith(tag[:n])), 0)
        body, self._held = buf[: len(buf) - partial], buf[len(buf) - partial :]
        if self._raw is not None:
            self._raw += body
            if body:
                out.append(("tool_call", body, None))
        else:
            kept = body.rstrip()  # whitespace waits: it is dropped if a call follows
            self._answer(out, kept)
            self._held = body[len(kept) :] + self._held
        return out

    def finish(self) -> list[tuple[Kind, str, Optional[ToolCall]]]:
        held, self._held = self._held, ""
        if self._raw is not None:
            raw, self._raw = self._raw + held, None
            return [("tool_call", held, parse_call(raw, self.schemas, closed=False))]
        if not held or (self._after_call and not held.strip()):
            return []
        return [("answer", held, None)]

    def _answer(self, out: list, text: str) -> None:
        if text:
            out.append(("answer", text, None))
            self._after_call = False
