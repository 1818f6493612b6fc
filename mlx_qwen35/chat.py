"""Multi-turn conversations that pay only for their new tokens (saved as sessions: :mod:`mlx_qwen35.session`).

Each turn re-renders the whole conversation with the checkpoint's template
(which drops past reasoning), so the new prompt is usually not a
continuation of what the cache holds. The cache is therefore snapshotted at
every message boundary (and every ``SNAPSHOT_EVERY`` tokens of long prompts);
a turn restores the latest snapshot inside the prefix it shares with the
previous prompt and prefills only from there. A reply that calls tools is kept
whole by the template (with its reasoning), so the turn of tool results goes on
from the cache as the reply left it: it prefills only the results and the
generation prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from . import session
from .engine import Generation, GenerationResult, run
from .errors import Qwen35Error
from .media import Media
from .model import cache as hybrid
from .processor import ImageSource
from .tokenizer import special_tokens
from .tools import Tool, result_messages
from .turn import Prompt, Settings, Turn, VideoSource, prepare

SNAPSHOT_EVERY = 4096
MAX_SNAPSHOTS = 16


@dataclass(eq=False)
class Chat(Settings):
    """A conversation with the model that keeps its cache across turns.

    ``send`` streams a reply (iterate it for pieces); ``ask`` returns the
    finished :class:`GenerationResult`. The :class:`~mlx_qwen35.turn.Settings`
    (``think``, ``thinking_budget``, ``sampling``, ``system``, ``max_tokens``,
    ``tools``) may be changed between turns. A reply that calls tools (its
    ``tool_calls``) is answered with ``send_tool_results``;
    :func:`~mlx_qwen35.tool_loop.ask_with_tools` runs Python functions as
    tools. ``history`` lists each turn's result, whose ``prefilled_tokens``
    says how many prompt tokens that turn actually ran.
    """

    model: Any = field(repr=False)
    tokenizer: Any = field(repr=False)

    def __post_init__(self):
        self.reset()

    # -- conversation ------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the conversation (settings stay)."""
        self.messages: list[dict] = []
        self.history: list[GenerationResult] = []
        self.media: list[Media] = []  # the conversation's images and videos, in prompt order
        self.cache = self.model.make_cache(self.kv_bits, mtp=self.model.has_mtp)  # so any turn may draft
        self.tokens: list[int] = []  # the prompt the snapshots belong to
        self.reply_tokens: list[int] = []  # the reply the cache holds after it
        self.snapshots: list[tuple[int, hybrid.Snapshot]] = [(0, hybrid.snapshot(self.cache))]

    def send(
        self,
        content: str,
        *,
        images: Sequence[ImageSource] = (),
        videos: Sequence[VideoSource] = (),
        stop: Sequence[str] = (),
        processors: Sequence[Callable] = (),
    ) -> Generation:
        """Stream the reply to a user message, with optional images and videos.

        The turn joins the conversation when the returned generation ends
        (or is closed early). ``processors`` are extra logits processors
        ``(tokens, logits) → logits``.
        """
        if not isinstance(content, str) or not content.strip():
            raise Qwen35Error("message: empty")
        return self._send(content, 1, images=images, videos=videos, stop=stop, processors=processors)

    def send_tool_results(self, results: Sequence, *, stop: Sequence[str] = (), processors=()) -> Generation:
        """Stream the reply to the results of the last reply's tool calls: one result per call, in order.

        A result is text (anything else is sent as JSON), or a dict with
        ``content`` and optionally the call's ``tool_call_id`` or ``name``.
        """
        calls = self.messages[-1].get("tool_calls") if self.messages else None
        messages = result_messages(calls or [], results)
        return self._send(messages, len(messages), stop=stop, processors=processors)

    def _send(self, prompt: Prompt, new: int, **options) -> Generation:
        """Generate after ``prompt``, whose ``new`` messages join the conversation with the reply."""
        turn = prepare(
            self.model, self.tokenizer, self, prompt, history=self.messages, history_media=self.media, **options
        )
        ids = turn.request.prompt.ids
        start = self._restore(ids)
        im_start = special_tokens(self.tokenizer).im_start
        stops = [i for i, t in enumerate(ids) if t == im_start and i > start]
        stops += range(start + SNAPSHOT_EVERY, len(ids), SNAPSHOT_EVERY)
        gen = run(
            self.model, self.tokenizer, replace(turn.request, start=start), self.cache,
            snapshot_at=stops, on_snapshot=self._snap, on_result=lambda r: self._record(turn, new, r),
        )
        self.tokens, self.reply_tokens = ids, []
        return gen

    def ask(self, content: str, **kwargs) -> GenerationResult:
        """Send a message (``send``'s arguments) and return the whole reply."""
        gen = self.send(content, **kwargs)
        for _ in gen:
            pass
        return gen.result

    def _record(self, turn: Turn, new: int, r: GenerationResult) -> None:
        self.media += turn.media
        reply = {"role": "assistant", "content": r.text}
        if r.reasoning:
            reply["reasoning_content"] = r.reasoning
        if r.tool_calls:
            reply["tool_calls"] = [c.as_message() for c in r.tool_calls]
        self.messages += [*turn.messages[-new:], reply]
        self.history.append(r)
        # The last token (a stop token, or the limit's) is not fed to the cache.
        self.reply_tokens = r.tokens[: hybrid.offset(self.cache) - len(self.tokens)]

    def _snap(self, n: int) -> None:
        self.snapshots.append((n, hybrid.snapshot(self.cache)))
        if len(self.snapshots) > MAX_SNAPSHOTS:
            del self.snapshots[1]  # the empty-cache snapshot at 0 always stays

    def _restore(self, ids: list[int]) -> int:
        """Rewind the cache to the latest snapshot inside the shared prefix; return its offset."""
        common = 0
        for a, b in zip(ids, self.tokens):
            if a != b:
                break
            common += 1
        # At least one prompt token must run to give the next token's logits.
        limit = min(common, len(ids) - 1)
        self.snapshots = [(n, s) for n, s in self.snapshots if n <= common]
        held = self.tokens + self.reply_tokens
        if len(held) < len(ids) and ids[: len(held)] == held and hybrid.offset(self.cache) == len(held):
            return len(held)  # the new prompt goes on from the cache as the last reply left it
        n, snap = max((x for x in self.snapshots if x[0] <= limit), key=lambda x: x[0])
        hybrid.restore(self.cache, snap, n)
        return n

    # -- sessions: see mlx_qwen35.session --------------------------------------------------

    def save(self, path: Union[str, Path]) -> Path:
        """Write the conversation, settings and full cache to one safetensors file, atomically."""
        return session.save(self, path)

    @classmethod
    def load(cls, path: Union[str, Path], model, tokenizer, *, tools: Optional[Sequence[Tool]] = None) -> "Chat":
        """Resume a saved session with ``model``, exactly where it stopped.

        A session keeps its tools as schemas: pass the Python functions again
        as ``tools`` to bind them to the saved tools of the same name.
        """
        return session.load(cls, path, model, tokenizer, tools=tools)
