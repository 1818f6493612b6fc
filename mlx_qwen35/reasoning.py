"""The thinking phase: split it from the answer while text streams, and end it gracefully.

:class:`ThinkingControl` watches the generated tokens and, at the thinking
budget or when reasoning loops, feeds a closing sentence in place of the next
token. :class:`ReasoningSplitter` splits the streamed text.

Qwen3.5 writes its reasoning as ``<think>\\n…\\n</think>\\n\\n`` before the
answer. The chat template's generation prompt decides where generation starts:
with thinking on it ends in ``<think>\\n`` (the model is already reasoning),
with thinking off in ``<think>\\n\\n</think>\\n\\n`` (the model answers at once).
The model may also write ``<think>`` itself.

What is stripped (the delimiters, never shown in any piece):

* ``<think>`` and at most one newline right after it;
* ``</think>``, at most one newline right before it and at most two right after it.

These are exactly the newlines the template writes around past reasoning, so
rendering ``{"reasoning_content": reasoning, "content": answer}`` back through
the template reproduces a generated turn of that shape. Any further whitespace belongs to
the text (the template trims it when it re-renders a turn). ``<think>`` switches
to reasoning and ``</think>`` to the answer wherever they appear; a tag that does
not change the state is dropped all the same.

Streaming holds back only a tail that could still become a delimiter (at most
``\\n</think`` or ``<think``): everything else is emitted as soon as it arrives.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Literal, Optional, Sequence

import numpy as np

from .tokenizer import SpecialTokens

Kind = Literal["reasoning", "answer"]

# Appended when the thinking budget or the loop guard ends reasoning: a sentence
# that reads naturally, then the template's own closing ("\n</think>\n\n").
CLOSING = "\n\nI have thought about this enough; time to give the answer.\n</think>\n\n"
# How many tokens a word cut by the budget may take to finish.
WORD_GRACE = 8

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

_TAG = re.compile(f"{re.escape(THINK_OPEN)}|\n?{re.escape(THINK_CLOSE)}")
# Prefixes a delimiter can start with, longest first; a buffer ending in one is held back.
_PARTIALS = sorted(
    {tag[:n] for tag in (THINK_OPEN, THINK_CLOSE, "\n" + THINK_CLOSE) for n in range(1, len(tag))},
    key=len,
    reverse=True,
)
# The template writes "<think>\n" and "\n</think>\n\n".
_NEWLINES_AFTER = {THINK_OPEN: 1, THINK_CLOSE: 2}


def thinking_opened(prompt: str) -> bool:
    """Whether the rendered prompt's generation prompt leaves a ``<think>`` block open.

    Only the text after the last ``<|im_start|>`` (the turn being generated) is
    looked at, so tags inside earlier turns or user text do not count.
    """
    turn = prompt.rsplit("<|im_start|>", 1)[-1]
    return turn.rfind(THINK_OPEN) > turn.rfind(THINK_CLOSE)


class ReasoningSplitter:
    """Feed text pieces, get ``(kind, text)`` pieces with the think delimiters removed.

    ``thinking_opened``: the prompt already opened ``<think>`` (see
    :func:`thinking_opened`), so generated text is reasoning until ``</think>``.
    Without any ``</think>``, everything is reasoning if thinking was opened and
    the answer otherwise. Call :meth:`finish` after the last piece.
    """

    def __init__(self, *, thinking_opened: bool):
        self.kind: Kind = "reasoning" if thinking_opened else "answer"
        self._held = ""
        self._skip_newlines = 0

    def feed(self, text: str) -> list[tuple[Kind, str]]:
        """The pieces that ``text`` completes (possibly none)."""
        out: list[tuple[Kind, str]] = []
        buf = self._held + text
        while True:
            buf = self._skip_delimiter_newlines(buf)
            match = _TAG.search(buf)
            if match is None:
                break
            self._emit(out, buf[: match.start()])
            tag = match.group().lstrip("\n")
            self.kind = "reasoning" if tag == THINK_OPEN else "answer"
            self._skip_newlines = _NEWLINES_AFTER[tag]
            buf = buf[match.end() :]
        hold = next((p for p in _PARTIALS if buf.endswith(p)), "")
        self._emit(out, buf[: len(buf) - len(hold)])
        self._held = hold
        return out

    def finish(self) -> list[tuple[Kind, str]]:
        """Flush the held-back tail: the stream ended, so it is text after all."""
        out: list[tuple[Kind, str]] = []
        self._emit(out, self._held)
        self._held = ""
        return out

    def _skip_delimiter_newlines(self, buf: str) -> str:
        if not self._skip_newlines:
            return buf
        skipped = min(len(buf) - len(buf.lstrip("\n")), self._skip_newlines)
        # The run of newlines may continue in the next piece only if this one ended inside it.
        self._skip_newlines = self._skip_newlines - skipped if skipped == len(buf) else 0
        return buf[skipped:]

    def _emit(self, out: list[tuple[Kind, str]], text: str) -> None:
        if text:
            out.append((self.kind, text))


def split_reasoning(text: str, *, thinking_opened: bool) -> tuple[str, str]:
    """(reasoning, answer) of a whole generated text, as :class:`ReasoningSplitter` streams it."""
    splitter = ReasoningSplitter(thinking_opened=thinking_opened)
    parts = {"reasoning": [], "answer": []}
    for kind, piece in splitter.feed(text) + splitter.finish():
        parts[kind].append(piece)
    return "".join(parts["reasoning"]), "".join(parts["answer"])


class ThinkingControl:
    """Ends reasoning gracefully: at the budget, or when it loops.

    It sees every sampled token before it is fed to the model and may replace
    it with the closing sentence. The cut waits for a word boundary (at most
    ``WORD_GRACE`` tokens), so no word is split.
    """

    def __init__(
        self, tokenizer, *, reasoning: bool, budget: Optional[int], special: SpecialTokens = SpecialTokens()
    ):
        self.tokenizer = tokenizer
        self.special = special
        self.reasoning = reasoning
        self.budget = budget
        self.count = 0  # reasoning tokens the model generated
        self.history: list[int] = []
        self.closing_reason: Optional[str] = None
        self._grace = 0
        self._prev_text = ""
        self._closing = None

    def closing_tokens(self) -> list[int]:
        if self._closing is None:
            self._closing = self.tokenizer.encode(CLOSING, add_special_tokens=False)
        return self._closing

    def observe(self, token: int) -> Optional[list[int]]:
        """Accept ``token`` (None) or return the tokens to feed instead."""
        if token == self.special.think_open:
            self.reasoning = True
            return None
        if not self.reasoning:
            return None
        if token == self.special.think_close or token in self.special.stop:
            self.reasoning = False
            return None
        text = self.tokenizer.decode([token])
        if self.closing_reason is None:
            if self.budget is not None and self.count >= self.budget:
                self.closing_reason = "budget"
            elif self.count % 8 == 0 and looping(self.history):
                self.closing_reason = "loop"
        if self.closing_reason is not None:
            if continues_word(self._prev_text, text) and self._grace < WORD_GRACE:
                self._grace += 1
            else:
                self.reasoning = False
                return self.closing_tokens()
        self.count += 1
        self.history.append(token)
        self._prev_text = text
        return None


def continues_word(before: str, after: str) -> bool:
    """Whether ``after`` would extend the word ``before`` ends with."""
    if not before or not after:
        return False
    a, b = before[-1], after[0]
    return a.isalnum() and b.isalnum() and not (_wide(a) or _wide(b))


def _wide(ch: str) -> bool:
    # CJK characters are words on their own.
    return unicodedata.east_asian_width(ch) in "WF"


def looping(tokens: Sequence[int], *, min_span: int = 64, max_period: int = 256, min_repeats: int = 3) -> bool:
    """Whether ``tokens`` end in a span repeated back to back: ≥ 3 copies covering ≥ 64 tokens."""
    n = len(tokens)
    if n < min_span:
        return False
    a = np.asarray(tokens[-min(n, max(min_span, max_period * min_repeats)) :])
    for p in range(1, max_period + 1):
        reps = max(min_repeats, -(-min_span // p))
        if reps * p > len(a):
            break
        tail = a[-reps * p :]
        if np.array_equal(tail[p:], tail[:-p]):
            return True
    return False
