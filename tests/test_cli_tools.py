"""--tools FILE.py for chat and generate: loading a file's functions, the tool loop, calls in the REPL and in --json.

The tiny model's replies are forced (tests/forcing.py) through the engine's
logits processors; the model still runs every step.
"""

from __future__ import annotations

import functools
import io
import json

import pytest
from forcing import scripted
from rich.console import Console
from test_cli import invoke, loaded, never_loaded, one_error_line  # noqa: F401 (fixtures)
from test_tools import call_text

from mlx_qwen35 import engine
from mlx_qwen35.chat import Chat
from mlx_qwen35.cli_tools import load_tools
from mlx_qwen35.errors import Qwen35Error
from mlx_qwen35.repl import Repl
from mlx_qwen35.sampling import Sampling

TOOLS_PY = '''
"""Tools for the tests."""
from os.path import join  # imported: not a tool


def get_weather(city: str, days: list[int] = None) -> dict:
    """Weather forecast for a city.

    Args:
        city: The city.
        days: Which days ahead.
    """
    return {"city": city, "sky": "sunny", "days": days}


def add(a: int, b: int) -> int:
    """Add two numbers.

    Args:
        a: The first.
        b: The second.
    """
    return a + b


def _helper():
    pass
'''

CALL = call_text("get_weather", {"city": "Paris", "days": "[1, 2]"})
RESULT = '{"city": "Paris", "sky": "sunny", "days": [1, 2]}'


@pytest.fixture
def tools_file(tmp_path):
    path = tmp_path / "my_tools.py"
    path.write_text(TOOLS_PY, encoding="utf-8")
    return path


@pytest.fixture
def forced(monkeypatch, loaded):  # noqa: F811
    """``forced(replies)``: the engine forces ``replies[k]`` in the k-th generation from now on."""
    _, tok = loaded

    def force(replies):
        processor = scripted(tok, replies)
        monkeypatch.setattr(engine, "make_processors", lambda sampling, max_tokens: [processor])

    return force


def test_a_files_own_public_functions_are_the_tools(tools_file):
    functions = load_tools(tools_file)
    assert [f.__name__ for f in functions] == ["get_weather", "add"]
    assert functions[1](2, 3) == 5


@pytest.mark.parametrize(
    "source, message",
    [
        (None, r"no such file \(expected a Python file of functions\)"),
        ("raise RuntimeError('boom')\n", r"importing it raised RuntimeError: boom"),
        ("def broken(:\n", r"importing it raised SyntaxError: "),
        ("import sys\nsys.exit(3)\n", r"importing it raised SystemExit: 3"),
        ("from os.path import join\n\ndef _private():\n    pass\n", r"defines no public functions"),
        ("def bare(x):\n    return x\n", r"cannot describe 'bare' as a tool: .*"),
    ],
)
def test_a_bad_tools_file_is_one_line(tmp_path, source, message):
    path = tmp_path / "t.py"
    if source is not None:
        path.write_text(source, encoding="utf-8")
    with pytest.raises(Qwen35Error, match=rf"^--tools {path}: {message}"):
        load_tools(path)


def test_generate_tools_fails_before_loading(never_loaded, chat_model_dir, tmp_path):  # noqa: F811
    r = invoke("generate", "--model", chat_model_dir, "-p", "Hi", "--tools", tmp_path / "absent.py")
    assert one_error_line(r) == f"error: --tools {tmp_path / 'absent.py'}: no such file (expected a Python file of functions)"


def test_generate_json_reports_every_call_and_runs_the_tools(forced, chat_model_dir, tools_file):
    invalid = call_text("add", {"a": "two", "b": "3"})
    forced([CALL + "\n" + invalid, "Sunny, and 5."])
    r = invoke("generate", "--model", chat_model_dir, "-p", "Weather?", "--tools", tools_file, "--json",
               "--max-tokens", 100)
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    assert (data["text"], data["finish_reason"]) == ("Sunny, and 5.", "stop")
    assert data["tool_calls"] == [
        {"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2]}, "valid": True, "error": None,
         "result": RESULT},
        {"name": "add", "arguments": {"a": "two", "b": 3}, "valid": False,
         "error": "parameter 'a': expected an integer, got 'two'",
         "result": "error: invalid call: parameter 'a': expected an integer, got 'two'"},
    ]


def test_generate_json_without_tools_has_no_calls(forced, chat_model_dir):
    forced([CALL])  # without tools, the markup is answer text
    r = invoke("generate", "--model", chat_model_dir, "-p", "Weather?", "--json", "--max-tokens", 60)
    data = json.loads(r.stdout)
    assert data["tool_calls"] == [] and data["text"] == CALL and data["finish_reason"] == "stop"


def test_generate_streams_calls_and_results_to_stderr(forced, chat_model_dir, tools_file):
    forced(["Let me look.\n\n" + CALL, "Sunny."])
    r = invoke("generate", "--model", chat_model_dir, "-p", "Weather?", "--tools", tools_file, "--max-tokens", 80)
    assert r.exit_code == 0, r.stderr
    assert r.stdout == "Let me look.\nSunny.\n"
    assert '→ get_weather {"city": "Paris", "days": [1, 2]}' in r.stderr and f"← {RESULT}" in r.stderr


def test_the_last_calls_are_reported_without_results_at_the_step_limit(forced, chat_model_dir, tools_file, monkeypatch):
    from mlx_qwen35 import tool_loop

    monkeypatch.setattr(tool_loop, "tool_rounds", functools.partial(tool_loop.tool_rounds, max_steps=1))
    forced([CALL])
    r = invoke("generate", "--model", chat_model_dir, "-p", "Weather?", "--tools", tools_file, "--json",
               "--max-tokens", 80)
    data = json.loads(r.stdout)
    assert data["finish_reason"] == "tool_calls"
    assert [c.get("result") for c in data["tool_calls"]] == [RESULT, None]


def repl(chat, lines) -> Repl:
    it = iter(lines)

    def read(prompt):
        line = next(it, None)
        if line is None:
            raise EOFError
        return line

    return Repl(chat, console=Console(file=io.StringIO(), width=200, soft_wrap=True, color_system=None), read=read)


def test_the_repl_shows_calls_and_results_and_runs_the_loop(forced, loaded, tools_file, tmp_path):  # noqa: F811
    model, tok = loaded
    forced(["Checking.\n\n" + CALL, "Sunny."])
    chat = Chat(model, tok, tools=load_tools(tools_file), sampling=Sampling(temperature=0.0), max_tokens=80)
    shell = repl(chat, ["Weather in Paris?", f"/save {tmp_path / 's.session'}", f"/load {tmp_path / 's.session'}"])
    shell.run()
    out = shell.out.file.getvalue()
    lines = out.splitlines()
    call_at = lines.index('→ get_weather {"city": "Paris", "days": [1, 2]}')
    assert lines[call_at - 1] == "Checking." and lines[call_at + 2] == f"← {RESULT}" and lines[call_at + 3] == "Sunny."
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "tool", "assistant"]
    assert shell.chat is not chat and shell.chat.tools == chat.tools  # /load binds the functions again


def test_chat_command_with_tools(forced, chat_model_dir, tools_file):
    forced([CALL, "Sunny."])
    r = invoke("chat", "--model", chat_model_dir, "--tools", tools_file, "--max-tokens", 80, input="Weather?\n")
    assert r.exit_code == 0, r.stderr
    assert "tools get_weather, add │" in r.stderr
    assert '→ get_weather {"city": "Paris", "days": [1, 2]}' in r.stdout and f"← {RESULT}" in r.stdout
    assert "Sunny." in r.stdout
