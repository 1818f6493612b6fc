"""The chat REPL: line editing and history, streamed replies with the reasoning dimmed, slash commands.

:class:`Repl` reads lines through a ``read(prompt)`` function (prompt-toolkit
in a terminal, plain ``input`` otherwise) and writes through a rich console,
so it runs the same in a terminal, a pipe, or a test.
"""

from __future__ import annotations

import os
import shlex
import time
from pathlib import Path
from typing import Callable, Optional

from rich.console import Console
from rich.text import Text

from .cli_tools import call_line, result_line
from .documents import document_message
from .errors import Qwen35Error
from .figures import Totals, stats_line
from .processor import load_image
from .turn import draft_tokens
from .video import load_video

PROMPT = "› "
MORE = "… "

HELP = """\
Type a message and press Enter; the answer streams, reasoning dimmed above it.

  /think on|off       think before answering (/think alone shows the setting)
  /budget N|off       end reasoning after about N tokens
  /max N              longest answer, in tokens (reasoning included)
  /system TEXT        set the system prompt (/system alone removes it)
  /mtp on|off|N       speculative decoding with the model's MTP head (N: most drafts a step)
  /file PATH [TEXT]   send a text file, followed by TEXT if given (quote a PATH with spaces)
  /image PATH         attach an image to the next message (repeatable)
  /video PATH         attach a video to the next message: an animated GIF or a folder of frames
  /save PATH          save the conversation and its cache
  /load PATH          resume a saved conversation (with its settings)
  /reset              start a new conversation
  /stats              totals for this session
  /help               this list
  /quit               leave (Ctrl-D too)

Several lines: end a line with \\ to continue on the next, or press Esc then Enter
(Alt+Enter) for a new line; pasted text keeps its lines. Start a message with //
to send a line that begins with /.
Ctrl-C stops the answer being written (the conversation keeps what was written)
or clears the line being typed. Arrow keys recall earlier input. With --tools,
the model's calls run and their results go back to it (shown dimmed)."""


def one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


class Repl:
    """An interactive conversation around a :class:`~mlx_qwen35.chat.Chat`."""

    def __init__(self, chat, *, console: Console, read: Callable[[str], str], recovery: Optional[Path] = None):
        from .plan import cache_root

        self.chat = chat
        self.out = console
        self.read = read
        self.recovery = recovery or cache_root() / "recovered"  # where an unexpected failure saves the conversation
        self.totals = Totals()
        self.tools = chat.tools  # kept across /load: a session keeps only the tools' schemas
        self.attached: dict[str, list] = {"images": [], "videos": []}  # for the next message
        self.commands: dict[str, Callable[[str], Optional[bool]]] = {
            "think": self.cmd_think,
            "budget": self.cmd_budget,
            "max": self.cmd_max,
            "system": self.cmd_system,
            "mtp": self.cmd_mtp,
            "file": self.cmd_file,
            "image": self.cmd_image,
            "video": self.cmd_video,
            "save": self.cmd_save,
            "load": self.cmd_load,
            "reset": self.cmd_reset,
            "stats": self.cmd_stats,
            "help": self.cmd_help,
            "quit": self.cmd_quit,
            "exit": self.cmd_quit,
        }

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> None:
        """Read and answer until /quit or end of input (Ctrl-D)."""
        while True:
            try:
                text = self.read_message()
            except KeyboardInterrupt:
                continue  # Ctrl-C at the prompt only clears what was typed
            except EOFError:
                return
            try:
                if not self.handle(text):
                    return
            except KeyboardInterrupt:  # outside an answer: while reading a file, saving, loading
                self.out.print(Text("[interrupted]", style="yellow"))
            except Qwen35Error as e:
                self.error(str(e))
            except Exception as e:  # a bug or a system failure costs this one input, never the conversation
                self.error(self.recover(e))

    def read_message(self) -> str:
        lines = [self.read(PROMPT)]
        while lines[-1].endswith("\\"):
            lines[-1] = lines[-1][:-1]
            lines.append(self.read(MORE))
        return "\n".join(lines)

    def handle(self, text: str) -> bool:
        """Act on one input; False means leave."""
        if not text.strip():
            return True
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # the reader maps bytes that are not UTF-8 to lone surrogates
            self.error("input: not valid UTF-8 (the terminal sent bytes that are not text); nothing was done")
            return True
        stripped = text.strip()
        if stripped.startswith("/") and not stripped.startswith("//"):
            name, _, arg = stripped[1:].partition(" ")
            command = self.commands.get(name.lower())
            if command is None:
                self.error(f"unknown command /{name} (/help lists them)")
                return True
            try:
                return command(arg.strip()) is not False
            except Qwen35Error as e:
                self.error(str(e))
                return True
        self.send(text[1:] if stripped.startswith("//") else text)
        return True

    def send(self, content: str) -> None:
        """One turn: stream the reply, then its figures; tool calls run and their results go back, for a few rounds."""
        from .tool_loop import tool_rounds  # imports MLX

        attached, self.attached = self.attached, {"images": [], "videos": []}
        try:
            gen = self.chat.send(content, **attached)
        except Qwen35Error as e:
            self.error(str(e))
            return
        for results, gen in tool_rounds(self.chat, gen):
            for _, text in results:
                self.note(result_line(text))
            if not self.stream(gen):
                return

    def stream(self, gen) -> bool:
        """Write a reply as it streams, then its figures; False if it was interrupted."""
        shown = None  # the kind of text being written
        fresh = True  # nothing of that kind written yet: leading newlines dropped
        interrupted = False
        try:
            for piece in gen:
                if piece.call is not None:  # a call shows as one line, once parsed
                    self.note(("\n" if shown else "") + call_line(piece.call))
                    shown = None
                if piece.kind == "tool_call":
                    continue
                if piece.kind != shown:
                    if piece.kind == "reasoning":
                        self.out.print(Text("thinking…", style="dim italic"))
                    elif shown == "reasoning":
                        self.out.print("\n")
                    shown, fresh = piece.kind, True
                text = piece.text.lstrip("\n") if fresh else piece.text
                if text:
                    fresh = False
                    self.out.print(Text(text, style="dim" if piece.kind == "reasoning" else ""), end="")
        except KeyboardInterrupt:
            interrupted = True
        except Qwen35Error as e:
            self.error(str(e))
        finally:
            gen.close()  # ends an interrupted generation; Chat keeps the partial turn
        if shown is not None:
            self.out.print()
        if interrupted:
            self.out.print(Text("[stopped; the conversation keeps the partial answer]", style="yellow"))
        r = gen.result
        if r is not None:
            self.totals.add(r)
            self.out.print(Text(stats_line(r), style="dim"))
        return not interrupted

    def error(self, message: str) -> None:
        self.out.print(Text(f"error: {message}", style="red"))

    def recover(self, e: Exception) -> str:
        """Save the conversation after an unexpected failure; one line saying what failed and where it is."""
        what = f"unexpected {one_line(e)}"
        if not self.chat.messages:
            return what
        path = self.recovery / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.session"
        try:
            self.recovery.mkdir(parents=True, exist_ok=True)
            self.chat.save(path)
        except Exception as e2:
            return f"{what}; the conversation could not be saved ({one_line(e2)})"
        return f"{what}; the conversation is saved in {path} (/load it to go on)"

    @property
    def context(self) -> int:
        """The model's context, in tokens."""
        return self.chat.model.config.text.max_position_embeddings

    def note(self, message: str) -> None:
        self.out.print(Text(message, style="dim"))

    # -- commands --------------------------------------------------------------------------------

    def cmd_think(self, arg: str) -> None:
        if arg:
            if arg.lower() not in ("on", "off"):
                raise Qwen35Error(f"/think: expected on or off, got {arg!r}")
            self.chat.think = arg.lower() == "on"
        self.note(f"thinking {'on' if self.chat.think else 'off'}")

    def cmd_budget(self, arg: str) -> None:
        if arg.lower() in ("off", "none"):
            self.chat.thinking_budget = None
        elif arg:
            if not arg.isdecimal():  # isdigit() also takes '²', which int() refuses
                raise Qwen35Error(f"/budget: expected a number of tokens or off, got {arg!r}")
            self.chat.thinking_budget = int(arg)
        budget = self.chat.thinking_budget
        self.note(f"thinking budget {'off' if budget is None else f'{budget} tokens'}")

    def cmd_max(self, arg: str) -> None:
        capped = ""
        if arg:
            if not arg.isdecimal() or int(arg) < 1:
                raise Qwen35Error(f"/max: expected a number of tokens ≥ 1, got {arg!r}")
            if int(arg) > self.context:  # as llama.cpp does: an answer cannot outgrow the context
                capped = " (capped at the model's context)"
            self.chat.max_tokens = min(int(arg), self.context)
        self.note(f"answers up to {self.chat.max_tokens} tokens{capped}")

    def cmd_mtp(self, arg: str) -> None:
        if arg:
            if arg.lower() not in ("on", "off") and not (arg.isdecimal() and 1 <= int(arg) <= 8):
                raise Qwen35Error(f"/mtp: expected on, off or a number of drafts from 1 to 8, got {arg!r}")
            if arg.lower() != "off" and not self.chat.model.has_mtp:
                raise Qwen35Error("/mtp: this model has no MTP head loaded (start with --mtp)")
            self.chat.mtp = arg.lower() != "off"
            if arg.isdecimal():
                self.chat.num_draft_tokens = int(arg)
        on = draft_tokens(self.chat.model, self.chat)
        self.note(f"speculative decoding {f'on, up to {on} drafts a step' if on else 'off'}")

    def cmd_system(self, arg: str) -> None:
        self.chat.system = arg or None
        self.note("system prompt set" if arg else "system prompt removed")

    def cmd_file(self, arg: str) -> None:
        try:
            words = shlex.split(arg)
        except ValueError as e:
            raise Qwen35Error(f"/file: {e}") from None
        if not words:
            raise Qwen35Error("/file: expected a PATH (and optionally a message)")
        content = document_message(words[0], " ".join(words[1:]), self.context)
        self.note(f"sending {words[0]} ({len(content):,} characters)")
        self.send(content)

    def cmd_image(self, arg: str) -> None:
        self._attach("image", arg, load_image)

    def cmd_video(self, arg: str) -> None:
        self._attach("video", arg, load_video)

    def _attach(self, kind: str, arg: str, check: Callable) -> None:
        words = shlex.split(arg) if arg else []
        if len(words) != 1:
            raise Qwen35Error(f"/{kind}: expected one PATH (quote a path with spaces)")
        path = Path(words[0]).expanduser()
        check(path)  # a bad file is reported now, not with the next message
        self.attached[f"{kind}s"].append(path)
        n = sum(len(v) for v in self.attached.values())
        self.note(f"{kind} {path.name} attached to the next message ({n} in all)")

    def cmd_save(self, arg: str) -> None:
        if not arg:
            raise Qwen35Error("/save: expected a PATH")
        if Path(arg).expanduser().is_dir():
            raise Qwen35Error(f"/save: {Path(arg).expanduser()} is a folder; expected a file name (e.g. chat.session)")
        path = self.chat.save(Path(arg).expanduser())
        self.note(f"saved {len(self.chat.messages)} messages to {path}")

    def cmd_load(self, arg: str) -> None:
        if not arg:
            raise Qwen35Error("/load: expected a PATH")
        self.chat = type(self.chat).load(Path(arg).expanduser(), self.chat.model, self.chat.tokenizer)
        if self.tools:
            self.chat.tools = self.tools
        c = self.chat
        self.note(
            f"resumed {len(c.messages)} messages │ thinking {'on' if c.think else 'off'}"
            + (f" │ system prompt: {c.system}" if c.system else "")
        )

    def cmd_reset(self, arg: str) -> None:
        self.chat.reset()
        self.attached = {"images": [], "videos": []}
        self.note("new conversation (settings kept)")

    def cmd_stats(self, arg: str) -> None:
        self.note(self.totals.line())
        self.note(f"conversation: {len(self.chat.messages)} messages, {len(self.chat.tokens)} tokens in the last prompt")

    def cmd_help(self, arg: str) -> None:
        self.out.print(Text(HELP))

    def cmd_quit(self, arg: str) -> bool:
        return False


def terminal_reader(history: Optional[Path] = None) -> Callable[[str], str]:
    """``read(prompt)`` with line editing and history (prompt-toolkit); Esc Enter inserts a newline."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory, InMemoryHistory
    from prompt_toolkit.key_binding import KeyBindings

    keys = KeyBindings()

    @keys.add("escape", "enter")
    def _newline(event):
        event.current_buffer.insert_text("\n")

    store = InMemoryHistory()
    if history is not None:
        try:
            history.parent.mkdir(parents=True, exist_ok=True)
            store = FileHistory(str(history))
        except OSError:
            pass  # an unwritable cache folder costs only the saved history
    session = PromptSession(history=store, key_bindings=keys)
    return lambda prompt: session.prompt(prompt)


def plain_reader(prompt: str) -> str:
    """``read(prompt)`` for input that is not a terminal (a pipe or a file)."""
    return input(prompt)
