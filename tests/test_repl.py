"""The chat REPL: a scripted session in a real terminal (a pty), and its commands driven in-process."""

from __future__ import annotations

import io
import json
import os
import re
import select
import signal
import struct
import sys
import time
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import pytest
from rich.console import Console

from mlx_qwen35 import session
from mlx_qwen35.chat import Chat
from mlx_qwen35.engine import GenerationResult
from mlx_qwen35.documents import MAX_TOKEN_BYTES, document_message
from mlx_qwen35.figures import Totals, stats_line
from mlx_qwen35.repl import Repl
from mlx_qwen35.sampling import Sampling

GREEDY = Sampling(temperature=0.0)
ANSI = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)|[=>])")
STATS = re.compile(r"prompt (\d+) tok \((\d+) new\) [\d.e-]+ tok/s │ generated (\d+) tok [\d.e-]+ tok/s │ peak [\d.]+ GB")


# ---------------------------------------------------------------------------------------------
# A real terminal


class Terminal:
    """A child process on a pty, read until markers appear."""

    def __init__(self, argv: list[str], env: dict):
        import fcntl
        import pty
        import termios

        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the pty is its controlling terminal, so Ctrl-C is SIGINT
            # A runner may start tests with SIGINT ignored, which Python would then keep ignoring.
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.execvpe(argv[0], argv, env)
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
        self.raw = ""
        self.seen = 0  # how much of the (ANSI-stripped) text earlier expects consumed

    @property
    def text(self) -> str:
        return ANSI.sub("", self.raw).replace("\r", "")

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return False
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            return False
        self.raw += data.decode("utf-8", "replace")
        return bool(data)

    def expect(self, pattern: str, timeout: float = 60) -> re.Match:
        """Wait for ``pattern`` (a regex) in the text after the previous match."""
        deadline = time.monotonic() + timeout
        while True:
            m = re.compile(pattern).search(self.text, self.seen)
            if m:
                self.seen = m.end()
                return m
            if time.monotonic() > deadline or not self._read(min(0.2, deadline - time.monotonic() + 0.01)):
                if time.monotonic() > deadline:
                    raise AssertionError(f"no {pattern!r} within {timeout} s; the terminal shows:\n{self.text[-3000:]}")

    def send(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def line(self, text: str, prompt: str = "›") -> None:
        """Type ``text`` and Enter once the prompt is drawn (typed earlier, the kernel would echo it)."""
        self.expect(prompt)
        self.send(text + "\r")

    def interrupt(self, timeout: float = 10) -> None:
        """Ctrl-C, once the line editor has handed the terminal back (so that it is SIGINT, not a key)."""
        import termios

        deadline = time.monotonic() + timeout
        while not termios.tcgetattr(self.fd)[3] & termios.ISIG:
            assert time.monotonic() < deadline, "the terminal stayed in raw mode"
            time.sleep(0.01)
        self.send("\x03")

    def wait(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._read(0.1)
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        raise AssertionError(f"still running after {timeout} s; the terminal shows:\n{self.text[-3000:]}")

    def close(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(self.fd)


def test_scripted_session_in_a_terminal(chat_model_dir, tmp_path):
    env = dict(
        os.environ,
        TERM="xterm-256color",
        PROMPT_TOOLKIT_NO_CPR="1",  # no cursor-position query for the test to answer
        XDG_CACHE_HOME=str(tmp_path / "cache"),  # the input history goes here
        HF_HUB_OFFLINE="1",
    )
    argv = [sys.executable, "-m", "mlx_qwen35.cli", "chat", "--model", str(chat_model_dir), "--temp", "0"]
    term = Terminal(argv, env)
    try:
        term.expect(r"/help for commands", timeout=120)
        term.line("/think on")
        term.expect(r"thinking on")
        term.line("/budget 3")
        term.expect(r"thinking budget 3 tokens")
        term.line("/max 40")
        term.expect(r"answers up to 40 tokens")
        term.line("/bogus")
        term.expect(r"error: unknown command /bogus")
        term.expect("›")
        os.write(term.fd, b"caf\xff\r")  # a byte that is not UTF-8, as a terminal in another encoding sends it
        term.expect(r"error: input: not valid UTF-8")

        # first turn, typed on two lines: reasoning (dimmed, under its header), then the answer and the figures
        term.line("Hello \\")
        term.line("there!", prompt="…")
        start = len(term.raw)
        turn = term.expect(r"thinking…\n(?P<body>[\s\S]*?)" + STATS.pattern, timeout=60)
        assert "I have thought about this enough" in turn["body"]  # the budget closed the reasoning
        assert "\x1b[2m" in term.raw[start:]  # dim
        prompt_tokens, prefilled, generated = (int(turn[i]) for i in (2, 3, 4))
        assert prompt_tokens == prefilled and 0 < generated <= 40

        # second turn, thinking off, stopped with Ctrl-C once the answer is streaming
        term.line("/think off")
        term.expect(r"thinking off")
        term.line("/max 100000")
        term.expect(r"answers up to 4096 tokens \(capped at the model's context\)")
        term.line("Tell me a long story.")
        term.expect(r"Tell me a long story\.\n\s*\S")
        term.interrupt()
        term.expect(r"\[stopped; the conversation keeps the partial answer\]")
        stopped = term.expect(STATS.pattern)
        assert int(stopped[3]) > 0
        assert int(stopped[2]) < int(stopped[1])  # the first turn came from the cache

        term.line("/stats")
        term.expect(r"2 turns \(1 stopped\)")
        term.expect(r"conversation: 4 messages")
        term.line("/quit")
        assert term.wait() == 0
    finally:
        term.close()


# ---------------------------------------------------------------------------------------------
# In-process: the same REPL with scripted input and a recorded console


def script(lines):
    """A ``read`` function answering each prompt with the next line, then end of input."""
    it = iter(lines)

    def read(prompt):
        line = next(it, None)
        if line is None:
            raise EOFError
        if isinstance(line, BaseException):
            raise line
        return line

    return read


def repl_for(chat, lines, file=None, recovery=None):
    console = Console(file=file or io.StringIO(), width=200, soft_wrap=True, color_system=None)
    return Repl(chat, console=console, read=script(lines), recovery=recovery)


def output(repl) -> str:
    return repl.out.file.getvalue()


@pytest.fixture
def chat(chat_model):
    model, tok = chat_model
    return Chat(model, tok, sampling=GREEDY, max_tokens=12)


def test_settings_commands_and_bad_input(chat):
    repl = repl_for(
        chat,
        ["/think on", "/budget 7", "/max 9", "/system Be terse.", "", "   ", "/think maybe", "/budget x",
         "/max 0", "/max ²", "/nope", "/file", "/save", KeyboardInterrupt(), "/help", "/quit", "never read"],
    )
    repl.run()
    out = output(repl)
    assert chat.think and chat.thinking_budget == 7 and chat.max_tokens == 9 and chat.system == "Be terse."
    assert chat.history == []  # blank input sends nothing
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: /think: expected on or off, got 'maybe'",
        "error: /budget: expected a number of tokens or off, got 'x'",
        "error: /max: expected a number of tokens ≥ 1, got '0'",
        "error: /max: expected a number of tokens ≥ 1, got '²'",
        "error: unknown command /nope (/help lists them)",
        "error: /file: expected a PATH (and optionally a message)",
        "error: /save: expected a PATH",
    ]
    assert "/think on|off" in out and "Esc then Enter" in out  # /help
    repl = repl_for(chat, ["/budget off", "/system"])
    repl.run()
    assert chat.thinking_budget is None and chat.system is None


def test_a_turn_shows_reasoning_answer_and_figures(chat):
    repl = repl_for(chat, ["/think on", "/budget 2", "/max 30", "What is 2+2?"])
    repl.run()
    r = chat.history[-1]
    out = output(repl)
    assert r.reasoning and r.text
    head, _, rest = out.partition("thinking…\n")
    # the reasoning under its header, then the answer, then the figures of that very turn
    reasoning_at = rest.index(r.reasoning.strip("\n"))
    answer_at = rest.index(r.text.strip("\n"), reasoning_at + len(r.reasoning.strip("\n")))
    assert rest.index(stats_line(r)) > answer_at
    assert f"prompt {r.prompt_tokens} tok ({r.prefilled_tokens} new)" in out


def test_multi_line_input_and_slash_escape(chat):
    repl = repl_for(chat, ["first line \\", "second line", "//etc/hosts is a file"])
    repl.run()
    assert [m["content"] for m in chat.messages if m["role"] == "user"] == [
        "first line \nsecond line",
        "/etc/hosts is a file",
    ]


def test_file_command(chat, tmp_path):
    doc = tmp_path / "notes 1.txt"
    doc.write_text("Line one.\nLine two.\n", encoding="utf-8")
    (tmp_path / "blob.bin").write_bytes(b"\x89PNG\r\n\x1a\n\0\0")
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "empty.txt").write_text("\n")
    repl = repl_for(
        chat,
        [f'/file "{doc}" Summarize it.', f"/file {tmp_path / 'missing.txt'}", f"/file {tmp_path / 'blob.bin'}",
         f"/file {tmp_path / 'latin.txt'}", f"/file {tmp_path / 'empty.txt'}", f"/file {tmp_path}"],
    )
    repl.run()
    users = [m["content"] for m in chat.messages if m["role"] == "user"]
    assert users == ["File notes 1.txt:\n\nLine one.\nLine two.\n\nSummarize it."]
    assert users[0] == document_message(doc, "Summarize it.")
    errors = [line for line in output(repl).splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: {tmp_path / 'missing.txt'}: no such file",
        f"error: {tmp_path / 'blob.bin'}: not a text file (binary, or not UTF-8)",
        f"error: {tmp_path / 'latin.txt'}: not a text file (binary, or not UTF-8)",
        f"error: {tmp_path / 'empty.txt'}: empty",
        f"error: {tmp_path}: is a folder, not a text file",
    ]


def test_prompt_longer_than_the_context_is_one_line(chat, tmp_path):
    doc = tmp_path / "long.txt"
    doc.write_text(" ".join(f"w{i}" for i in range(3000)), encoding="utf-8")  # > 4096 tokens
    repl = repl_for(chat, [f"/file {doc}", "/stats"])
    repl.run()
    errors = [line for line in output(repl).splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "longer than the model's context of 4096" in errors[0]
    assert chat.messages == [] and "0 turns" in output(repl)


class InterruptingFile(io.StringIO):
    """Raises KeyboardInterrupt (as Ctrl-C would) on the n-th write after arming."""

    def __init__(self, after: int):
        super().__init__()
        self.after = after
        self.armed = False

    def write(self, s):
        if self.armed:
            self.after -= 1
            if self.after == 0:
                self.armed = False
                raise KeyboardInterrupt
        return super().write(s)


def test_interrupt_keeps_the_conversation(chat):
    file = InterruptingFile(after=3)
    repl = repl_for(chat, ["Count to ten.", "/stats", "And again."], file=file)
    original = repl.send

    def send(content):
        file.armed = content == "Count to ten."
        original(content)

    repl.send = send
    repl.run()
    first, second = chat.history
    assert first.finish_reason == "interrupted" and 0 < first.generation_tokens < chat.max_tokens
    assert second.finish_reason == "length"
    assert [m["role"] for m in chat.messages] == ["user", "assistant"] * 2
    out = output(repl)
    assert "[stopped; the conversation keeps the partial answer]" in out
    assert "1 turn (1 stopped)" in out


def test_save_reset_load(chat, tmp_path):
    path = tmp_path / "s.session"
    repl = repl_for(chat, ["Hi.", f"/save {path}", "/reset", "/stats", f"/load {path}", "Go on."])
    repl.run()
    out = output(repl)
    assert f"saved 2 messages to {path}" in out
    assert "conversation: 0 messages" in out
    assert "resumed 2 messages │ thinking off" in out
    assert repl.chat is not chat and [m["content"] for m in repl.chat.messages[::2]] == ["Hi.", "Go on."]
    # the resumed cache held the first turn: only the new turn was prefilled
    r = repl.chat.history[-1]
    assert r.prefilled_tokens < r.prompt_tokens
    repl = repl_for(chat, [f"/load {tmp_path / 'nothing.session'}"])
    repl.run()
    assert f"error: {tmp_path / 'nothing.session'}: no such session file" in output(repl)


def result(**kw) -> GenerationResult:
    base = GenerationResult(
        text="a", reasoning="", finish_reason="stop", prompt_tokens=37, prefilled_tokens=12, generation_tokens=23,
        prompt_tps=400.0, generation_tps=23.1, peak_memory_gb=1.234,
    )
    return replace(base, **kw)


def test_stats_lines():
    assert stats_line(result()) == "prompt 37 tok (12 new) 400.0 tok/s │ generated 23 tok 23.1 tok/s │ peak 1.23 GB"
    assert stats_line(result(finish_reason="length")).endswith(" │ hit the token limit")
    assert stats_line(result(prompt_tps=0.0687, generation_tps=0.05179)).startswith(
        "prompt 37 tok (12 new) 0.069 tok/s │ generated 23 tok 0.052 tok/s"
    )
    totals = Totals()
    totals.add(result())  # 12 prefilled in 0.03 s, 23 generated in ~0.996 s
    totals.add(result(prompt_tokens=80, prefilled_tokens=48, prompt_tps=960.0, generation_tokens=46,
                      generation_tps=46.2, peak_memory_gb=2.5, finish_reason="interrupted"))
    assert totals.line() == (
        "2 turns (1 stopped) │ prompt 117 tok, 60 prefilled at 750.0 tok/s │ "
        f"generated 69 tok at {69 / (23 / 23.1 + 46 / 46.2):.1f} tok/s │ peak 2.50 GB"
    )


def test_image_and_video_attach_to_the_next_message(chat, tmp_path):
    from PIL import Image

    img = tmp_path / "cat picture.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(img)
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(4):
        Image.new("RGB", (64, 64), (i * 60, 0, 0)).save(frames / f"{i}.png")
    (tmp_path / "notes.txt").write_text("words")
    repl = repl_for(
        chat,
        [f'/image "{img}"', f"/video {frames}", f"/image {tmp_path / 'notes.txt'}", "/image", "Describe them.",
         "And now?"],
    )
    repl.run()
    out = output(repl)
    assert "image cat picture.png attached to the next message (1 in all)" in out
    assert "video frames attached to the next message (2 in all)" in out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and "notes.txt" in errors[0] and errors[1].startswith("error: /image: expected one PATH")
    assert [m.kind for m in chat.media] == ["image", "video"]  # attached to the first message only
    first, second = chat.messages[0]["content"], chat.messages[2]["content"]
    assert [c["type"] for c in first] == ["image", "video", "text"] and second == "And now?"


# ---------------------------------------------------------------------------------------------
# Nothing typed crashes the session


def errors_of(repl) -> list[str]:
    return [line for line in output(repl).splitlines() if line.startswith("error:")]


def test_input_that_is_not_utf8_is_one_line(chat):
    # what a reader makes of bytes that are not UTF-8 (prompt-toolkit and Python's stdin: surrogateescape)
    bad = b"caf\xff".decode("utf-8", "surrogateescape")
    repl = repl_for(chat, [bad, f"/system {bad}", "/stats"])
    repl.run()
    message = "error: input: not valid UTF-8 (the terminal sent bytes that are not text); nothing was done"
    assert errors_of(repl) == [message] * 2
    assert chat.system is None and chat.history == [] and "0 turns" in output(repl)


def test_save_onto_a_folder_is_one_line(chat, tmp_path):
    repl = repl_for(chat, ["Hi.", f"/save {tmp_path}", "/stats"])
    repl.run()
    assert errors_of(repl) == [f"error: /save: {tmp_path} is a folder; expected a file name (e.g. chat.session)"]
    assert "conversation: 2 messages" in output(repl)


def rewrite_session(src: Path, dst: Path, edit) -> Path:
    """``src`` with its metadata edited and its checksum recomputed, so that only the edit is wrong."""
    arrays, metadata = mx.load(str(src), format="safetensors", return_metadata=True)
    meta = json.loads(metadata["session"])
    meta.pop("digest")
    edit(meta)
    meta["digest"] = session._digest(meta, arrays)
    tmp = dst.with_suffix(".safetensors")  # MLX would append the suffix
    mx.save_safetensors(str(tmp), arrays, metadata={"session": json.dumps(meta)})
    return tmp.rename(dst)


def test_load_of_malformed_metadata_is_one_line(chat, tmp_path):
    saved = tmp_path / "good.session"
    chat.ask("Hi.")
    chat.save(saved)
    cases = {  # what is edited → what the one line says
        "settings.think": (lambda m: m["settings"].pop("think"), "lacks 'settings.think'"),
        "model": (lambda m: m.pop("model"), "lacks 'model'"),
        "tokens": (lambda m: m.update(tokens="1 2 3"), "'tokens' must be a list of token ids, got \"1 2 3\""),
        "max_tokens": (
            lambda m: m["settings"].update(max_tokens=True),
            "'settings.max_tokens' must be a number of tokens, got true",
        ),
        "sampling": (
            lambda m: m["settings"].update(sampling={"temp": 0}), "'settings.sampling' has an unknown key 'temp'"
        ),
        "role": (lambda m: m["messages"][0].pop("role"), "lacks 'messages.0.role'"),
        "kv_offsets": (lambda m: m["kv_offsets"].pop(), "'kv_offsets' has 3 layers, not 4"),  # TEXT: 4 layers
    }
    paths = {name: rewrite_session(saved, tmp_path / f"{name}.session", edit) for name, (edit, _) in cases.items()}
    repl = repl_for(chat, [f"/load {p}" for p in paths.values()] + ["/stats"])
    repl.run()
    expected = [f"error: {paths[name]}: session metadata {message}" for name, (_, message) in cases.items()]
    assert errors_of(repl) == expected
    assert repl.chat is chat and "conversation: 2 messages" in output(repl)
    untouched = rewrite_session(saved, tmp_path / "same.session", lambda m: None)
    assert Chat.load(untouched, chat.model, chat.tokenizer).messages == chat.messages


def test_unexpected_failure_saves_the_conversation(chat, tmp_path, monkeypatch):
    def broken():
        raise RuntimeError("disk\nfull")

    repl = repl_for(chat, ["/reset", "Hi.", "/reset", "/stats"], recovery=tmp_path / "recovered")
    monkeypatch.setattr(chat, "reset", broken)
    repl.run()
    first, second = errors_of(repl)
    assert first == "error: unexpected RuntimeError: disk full"  # nothing to save yet
    saved = r"error: unexpected RuntimeError: disk full; the conversation is saved in (\S+) \(/load it to go on\)"
    m = re.fullmatch(saved, second)
    assert m, second
    path = Path(m[1])
    assert path.parent == tmp_path / "recovered" and path.suffix == ".session"
    assert Chat.load(path, chat.model, chat.tokenizer).messages == chat.messages
    assert "1 turn" in output(repl)  # the REPL went on


def test_max_is_capped_at_the_context(chat):
    context = chat.model.config.text.max_position_embeddings
    repl = repl_for(chat, ["/max 99999999999999999999999", f"/max {context - 1}"])
    repl.run()
    assert f"answers up to {context} tokens (capped at the model's context)" in output(repl)
    assert f"answers up to {context - 1} tokens\n" in output(repl) and chat.max_tokens == context - 1


def test_max_token_bytes_is_the_longest_token():
    import base64

    from tokenizer_fixture import _tiktoken_file

    ranks = _tiktoken_file().read_bytes().split()[::2]  # lines of "base64-token rank"
    assert max(len(base64.b64decode(t)) for t in ranks) == MAX_TOKEN_BYTES


def test_file_reading_stops_at_what_the_context_holds(chat, tmp_path):
    limit = MAX_TOKEN_BYTES * chat.model.config.text.max_position_embeddings
    big = tmp_path / "big.txt"
    with open(big, "wb") as f:
        f.truncate(limit + 1)  # sparse: nothing is written
    repl = repl_for(chat, [f"/file {big}"])
    repl.run()
    message = f"over {limit:,} bytes, more than the model's context of 4,096 tokens can hold (reading stopped there)"
    assert errors_of(repl) == [f"error: {big}: {message}"]
    repl = repl_for(chat, ["/file /dev/zero", "/stats"])  # endless: only the bound ends it
    repl.run()
    assert errors_of(repl) == [f"error: /dev/zero: {message}"] and chat.messages == []
