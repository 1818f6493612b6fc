"""Generated token ids → streamed text pieces, marked reasoning, answer or tool call, cut at stop strings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Sequence

from .reasoning import ReasoningSplitter
from .tokenizer import special_tokens
from .tools import ToolCall, ToolCallSplitter


@dataclass
class Piece:
    """A streamed piece of text, marked as reasoning, answer or tool call (the call's markup).

    The piece that ends a tool call carries the parsed ``call``.
    """

    text: str
    kind: Literal["reasoning", "answer", "tool_call"]
    call: Optional[ToolCall] = None


class TextStream:
    """Turns generated token ids into :class:`Piece` objects and the final texts (``parts``).

    Holds back text that could still become a user stop string. With ``tools``
    (function schemas), tool calls are taken out of the answer text after the
    stop strings are applied; ``tool_calls`` lists them.
    """

    def __init__(self, tokenizer, *, reasoning: bool, stop: Sequence[str] = (), tools: Sequence[dict] = ()):
        self.detok = tokenizer.detokenizer
        self.detok.reset()
        self.special = special_tokens(tokenizer)
        self.splitter = ReasoningSplitter(thinking_opened=reasoning)
        self.stop = [s for s in stop if s]
        self.calls = ToolCallSplitter(tools) if tools else None
        self.parts = {"reasoning": [], "answer": [], "tool_call": []}
        self.tool_calls: list[ToolCall] = []
        self.stopped = False
        self._pending: list[Piece] = []

    def add(self, token: int) -> list[Piece]:
        if token in self.special.stop:
            return []
        self.detok.add_token(token)
        return self._emit(self._route(self.splitter.feed(self.detok.last_segment)))

    def finish(self) -> list[Piece]:
        self.detok.finalize()
        out = self._route(self.splitter.feed(self.detok.last_segment) + self.splitter.finish())
        # The held-back tail can no longer become a stop string.
        out, self._pending = out + self._pending, []
        return self._emit(out, end=True)

    def _emit(self, pieces: list[Piece], end: bool = False) -> list[Piece]:
        """Take the tool calls out of the answer pieces; record the texts."""
        if self.calls is not None:
            split = []
            for p in pieces:
                split += self.calls.feed(p.text) if p.kind == "answer" else [(p.kind, p.text, None)]
            split += self.calls.finish() if end else []
            pieces = [Piece(text, kind, call) for kind, text, call in split]
        for p in pieces:
            self.parts[p.kind].append(p.text)
            if p.call is not None:
                self.tool_calls.append(p.call)
        return pieces

    def _route(self, pieces) -> list[Piece]:
        """Queue new pieces; release those that can no longer start a stop string."""
        if self.stopped:
            return []
        self._pending += [Piece(text, kind) for kind, text in pieces]
        if not self.stop:
            out, self._pending = self._pending, []
        else:
            text = "".join(p.text for p in self._pending)
            hit = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
            if hit >= 0:
                self.stopped = True
                keep = hit
            else:
                longest = max(len(s) for s in self.stop) - 1
                keep = max(0, len(text) - longest)
            out = _take_chars(self._pending, keep)
            self._pending = [] if self.stopped else _drop_chars(self._pending, keep)
        return out


def _take_chars(pieces: list[Piece], n: int) -> list[Piece]:
    out = []
    for p in pieces:
        if n <= 0:
            break
        out.append(Piece(p.text[:n], p.kind))
        n -= len(p.text)
    return [p for p in out if p.text]


def _drop_chars(pieces: list[Piece], n: int) -> list[Piece]:
    out = []
    for p in pieces:
        if n >= len(p.text):
            n -= len(p.text)
            continue
        out.append(Piece(p.text[n:], p.kind))
        n = 0
    return out
