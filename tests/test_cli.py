"""The command line (generate, info, help, bad input) and the model resolution behind chat and generate."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import rel_err
from mlx.utils import tree_flatten
from mlx_lm.models.cache import ArraysCache
from typer.testing import CliRunner

import mlx_qwen35
from mlx_qwen35 import memory
from mlx_qwen35 import plan as planning
from mlx_qwen35.cli import app, main
from mlx_qwen35.cli_options import Preset
from mlx_qwen35.documents import MAX_TOKEN_BYTES, document_message
from mlx_qwen35.engine import prefill
from mlx_qwen35.errors import Qwen35Error
from mlx_qwen35.sampling import PRESETS

runner = CliRunner()
EMPTY_MODEL = "empty; expected a local folder or a hub id (leave it out for the default)"


def invoke(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input, env={"COLUMNS": "200"})


def one_error_line(result) -> str:
    assert result.exit_code != 0 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


@pytest.fixture
def loaded(monkeypatch, chat_model, chat_model_dir):
    """chat/generate get the session's model (float32, as `auto` plans on a CPU) instead of reloading it.

    Loading itself runs end to end in test_console_script_json_from_stdin.
    """
    real = planning.load_plan

    def load_plan(plan, chat_template=None):
        if plan.folder == chat_model_dir and plan.dtype == mx.float32 and chat_template is None:
            return chat_model
        return real(plan, chat_template)

    monkeypatch.setattr(planning, "load_plan", load_plan)
    return chat_model


def greedy(preset: str):
    return replace(PRESETS[preset], temperature=0.0)


# ---------------------------------------------------------------------------------------------
# generate


def test_generate_json_is_the_api_result(loaded, chat_model_dir):
    model, tok = loaded
    r = invoke("generate", "--model", chat_model_dir, "-p", "Name three colors.", "--temp", "0", "--max-tokens", 12,
               "--json")
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    api = mlx_qwen35.generate(model, tok, "Name three colors.", sampling=greedy("instruct"), max_tokens=12)
    assert (data["reasoning"], data["text"], data["finish_reason"]) == ("", api.text, api.finish_reason)
    for k in ("prompt_tokens", "prefilled_tokens", "generation_tokens", "draft_tokens", "accepted_draft_tokens"):
        assert data["stats"][k] == getattr(api, k)
    assert set(data["stats"]) == {"prompt_tokens", "prefilled_tokens", "generation_tokens", "prompt_tps",
                                  "generation_tps", "peak_memory_gb", "draft_tokens", "accepted_draft_tokens"}

    r = invoke("generate", "--model", chat_model_dir, "-p", "Why?", "--think", "--thinking-budget", 3, "--temp", "0",
               "--max-tokens", 30, "--json", "--system", "Be brief.")
    data = json.loads(r.stdout)
    api = mlx_qwen35.generate(model, tok, "Why?", think=True, thinking_budget=3, system="Be brief.",
                              sampling=greedy("thinking"), max_tokens=30)
    assert data["reasoning"] and (data["reasoning"], data["text"]) == (api.reasoning, api.text)


def test_generate_streams_answer_to_stdout_and_reasoning_to_stderr(loaded, chat_model_dir):
    model, tok = loaded
    r = invoke("generate", "--model", chat_model_dir, "--think", "--thinking-budget", 2, "--preset", "thinking-coding",
               "--temp", "0", "--max-tokens", 24, input="What is 6 x 7?")  # the prompt from stdin
    assert r.exit_code == 0, r.stderr
    api = mlx_qwen35.generate(model, tok, "What is 6 x 7?", think=True, thinking_budget=2,
                              sampling=greedy("thinking-coding"), max_tokens=24)
    assert api.reasoning and api.text
    assert r.stdout == api.text + ("" if api.text.endswith("\n") else "\n")
    assert api.reasoning in r.stderr and api.reasoning not in r.stdout
    assert f"prompt {api.prompt_tokens} tok ({api.prefilled_tokens} new)" in r.stderr
    assert "hit the token limit" in r.stderr


def test_generate_file_and_stop(loaded, chat_model_dir, tmp_path):
    model, tok = loaded
    doc = tmp_path / "doc.md"
    doc.write_text("# Title\n\nSome text.\n", encoding="utf-8")
    r = invoke("generate", "--model", chat_model_dir, "--file", doc, "-p", "Summarize.", "--temp", "0",
               "--max-tokens", 10, "--json", "--kv-bits", 8)
    assert r.exit_code == 0, r.stderr
    api = mlx_qwen35.Chat(model, tok, sampling=greedy("instruct"), max_tokens=10, kv_bits=8).ask(
        document_message(doc, "Summarize.")
    )
    assert json.loads(r.stdout)["text"] == api.text
    # a stop string taken from the greedy answer ends it there
    full = mlx_qwen35.generate(model, tok, "Hi", sampling=greedy("instruct"), max_tokens=10).text
    cut = full[len(full) // 2 :][:3]
    r = invoke("generate", "--model", chat_model_dir, "-p", "Hi", "--temp", "0", "--max-tokens", 10, "--json",
               "--stop", cut)
    data = json.loads(r.stdout)
    assert data["text"] == full[: full.index(cut)] and data["finish_reason"] == "stop"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--temp", "-1"], "error: temperature: must be ≥ 0, got -1.0"),
        (["--top-p", "0"], "error: top_p: must be in (0, 1], got 0.0"),
        (["--top-p", "1.5"], "error: top_p: must be in (0, 1], got 1.5"),
        (["--min-p", "1"], "error: min_p: must be in [0, 1), got 1.0"),
        (["--kv-bits", "3"], "error: --kv-bits: 3 is not one of 4, 8"),
        (["-p", "   "], "error: prompt: empty"),
        (["-p", "caf\udcff"], "error: --prompt: not valid UTF-8"),  # how Python passes argv bytes that are not UTF-8
        (["-p", "hi", "--system", "\udcff"], "error: --system: not valid UTF-8"),
        (["-p", "hi", "--stop", "\udcff"], "error: --stop: not valid UTF-8"),
        (["-p", "hi", "--model", ""], f"error: --model: {EMPTY_MODEL}"),
    ],
)
def test_generate_bad_values_fail_before_loading(args, message):
    r = invoke("generate", "--model", "/nonexistent/never/loaded", *args)
    assert one_error_line(r) == message and r.exit_code == 1


@pytest.fixture
def never_loaded(monkeypatch):
    """Planning runs (it reads the config); loading the weights fails the test."""
    monkeypatch.setattr(planning, "load_plan", lambda *a: pytest.fail("loaded"))


def test_bad_stdin_fails_before_loading(never_loaded, chat_model_dir):
    limit = MAX_TOKEN_BYTES * 4096  # the tiny model's context
    too_long = f"over {limit:,} bytes, more than the model's context of 4,096 tokens can hold (reading stopped there)"
    for stdin, message in [
        (b"", "error: prompt: empty"),
        (b"caf\xff", "error: stdin: not valid UTF-8 (byte 3)"),
        (b"word " * (limit // 5 + 1), f"error: stdin: {too_long}"),
    ]:
        assert one_error_line(invoke("generate", "--model", chat_model_dir, input=stdin)) == message
    for args, message in [
        (["chat", "--model", "/nonexistent/never/loaded", "--system", "\udcff"], "error: --system: not valid UTF-8"),
        (["chat", "--model", ""], f"error: --model: {EMPTY_MODEL}"),
        (["info", ""], f"error: MODEL: {EMPTY_MODEL}"),
    ]:
        assert one_error_line(invoke(*args)) == message


def test_file_reading_stops_at_what_the_context_holds(never_loaded, chat_model_dir, tmp_path):
    limit = MAX_TOKEN_BYTES * 4096
    big = tmp_path / "big.txt"
    with open(big, "wb") as f:
        f.truncate(limit + 1)  # sparse: nothing is written
    message = f"over {limit:,} bytes, more than the model's context of 4,096 tokens can hold (reading stopped there)"
    assert one_error_line(invoke("generate", "--model", chat_model_dir, "--file", big)) == f"error: {big}: {message}"
    # endless: only the bound ends it
    assert one_error_line(invoke("generate", "--model", chat_model_dir, "--file", "/dev/zero")) == (
        f"error: /dev/zero: {message}"
    )


def test_max_tokens_is_capped_at_the_context(loaded, chat_model_dir, monkeypatch):
    asked = []

    def send(self, *a, **k):
        asked.append(self.max_tokens)
        raise Qwen35Error("stopped here")

    monkeypatch.setattr(mlx_qwen35.Chat, "send", send)
    r = invoke("generate", "--model", chat_model_dir, "-p", "Hi", "--max-tokens", "99999999999999999999999")
    assert one_error_line(r) == "error: stopped here" and asked == [4096]  # the tiny model's context
    assert "--max-tokens: 99999999999999999999999 is more than the model's context; capped at 4096 tokens" in r.stderr


def test_json_errors_are_json_on_stdout(tmp_path, monkeypatch, capsys):
    r = invoke("generate", "--model", tmp_path / "missing", "-p", "hi", "--json")
    line = one_error_line(r)  # the plain line stays on stderr
    assert r.exit_code == 1 and json.loads(r.stdout) == {"error": line.removeprefix("error: ")}
    assert line.startswith(f"error: {tmp_path / 'missing'}: no such folder")
    r = invoke("generate", "--model", tmp_path / "missing", "-p", "caf\udcff", "--json")
    assert json.loads(r.stdout) == {"error": "--prompt: not valid UTF-8"}
    # a usage error, from the console entry point
    monkeypatch.setattr(sys, "argv", ["mlx_qwen35", "generate", "--json", "--max-tokens", "0"])
    with pytest.raises(SystemExit) as e:
        main()
    out = capsys.readouterr()
    assert e.value.code == 2 and "--max-tokens" in json.loads(out.out)["error"] and out.err.startswith("error:")


def test_bytes_that_are_not_utf8_from_a_real_process(chat_model_dir, tmp_path):
    """Python turns such argv bytes into lone surrogates, and stdin's into a decoding error: one line each."""
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path), HF_HUB_OFFLINE="1")
    cli = [sys.executable, "-m", "mlx_qwen35.cli", "generate", "--model", str(chat_model_dir)]
    for extra, stdin, message in [
        ([b"-p", b"caf\xff", b"--json"], b"", "--prompt: not valid UTF-8"),
        ([b"--json"], b"caf\xff", "stdin: not valid UTF-8 (byte 3)"),
    ]:
        out = subprocess.run(cli + extra, input=stdin, capture_output=True, env=env, timeout=300)
        assert out.returncode == 1 and b"Traceback" not in out.stderr, out.stderr
        assert json.loads(out.stdout) == {"error": message}


def test_generate_bad_inputs(loaded, chat_model_dir, tmp_path):
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)))
    long = tmp_path / "long.txt"
    long.write_text(" ".join(f"w{i}" for i in range(3000)), encoding="utf-8")
    cases = [
        (["--model", tmp_path / "missing", "-p", "hi"], f"{tmp_path / 'missing'}: no such folder"),
        (["--model", chat_model_dir, "--file", tmp_path / "nope.txt"], f"{tmp_path / 'nope.txt'}: no such file"),
        (["--model", chat_model_dir, "--file", tmp_path / "blob.bin"], "not a text file (binary, or not UTF-8)"),
        (["--model", chat_model_dir, "--file", long], "tokens, longer than the model's context of 4096"),
    ]
    for args, message in cases:
        line = one_error_line(invoke("generate", *args))
        assert message in line, line


def test_offline_hub_id_is_one_line(monkeypatch, tmp_path):
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for args in (["--model", "Qwen/Qwen3.5-0.8B"], []):  # an explicit id, and the default model
        line = one_error_line(invoke("generate", *args, "-p", "hi"))
        repo = args[1] if args else planning.DEFAULT_MODEL
        assert line.startswith(f"error: {repo}: could not fetch from the Hugging Face hub (")
    line = one_error_line(invoke("info", "Qwen/Qwen3.5-0.8B"))
    assert "could not fetch" in line


def test_usage_errors_are_one_line(monkeypatch, capsys):
    for argv, message in [
        (["generate", "--max-tokens", "0"], "error: Invalid value for '--max-tokens'"),
        (["chat", "--precision", "3bit"], "error: Invalid value for '--precision'"),
        (["generate", "--top-k", "many"], "error: Invalid value for '--top-k'"),
        (["generate", "--seed", "-1"], "error: Invalid value for '--seed'"),
        (["chat", "--seed", str(2**64)], "error: Invalid value for '--seed'"),
        (["generate", "--chat-template", "/no/such/template.jinja"], "error: Invalid value for '--chat-template'"),
        (["nonsense"], "error: No such command 'nonsense'."),
    ]:
        monkeypatch.setattr(sys, "argv", ["mlx_qwen35", *argv])
        with pytest.raises(SystemExit) as e:
            main()
        err = capsys.readouterr().err
        assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and err.startswith(message), err


def test_help_of_every_command():
    for command, names in {
        None: ["chat", "generate", "convert", "info"],
        "chat": ["--model", "--precision", "--think", "--thinking-budget", "--kv-bits", "--chat-template", "--temp"],
        "generate": ["--prompt", "--file", "--json", "--stop", "--preset", "--top-p", "--seed", "--no-think"],
        "info": ["MODEL", "--precision"],
        "convert": ["--hf-path", "--mlx-path", "--q-bits"],
    }.items():
        r = invoke(*([command] if command else []), "--help")
        assert r.exit_code == 0
        for name in names:
            assert name in r.stdout, (command, name)
    assert {p.value for p in Preset} == set(PRESETS)


def test_console_script_json_from_stdin(chat_model_dir, chat_model, tmp_path):
    """End to end, as a user runs it: the installed entry point, stdin, real loading (auto → float32 on a CPU)."""
    script = Path(sys.executable).with_name("mlx_qwen35")
    argv = [str(script)] if script.exists() else [sys.executable, "-m", "mlx_qwen35.cli"]
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path), HF_HUB_OFFLINE="1")
    out = subprocess.run(
        argv + ["generate", "--model", str(chat_model_dir), "--json", "--temp", "0", "--max-tokens", "8"],
        input="hi", capture_output=True, text=True, env=env, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    model, tok = chat_model
    api = mlx_qwen35.generate(model, tok, "hi", sampling=greedy("instruct"), max_tokens=8)
    assert json.loads(out.stdout)["text"] == api.text
    if mx.metal.is_available():
        assert planning.CPU_NOTE not in out.stderr
    else:
        assert planning.CPU_NOTE in out.stderr


# ---------------------------------------------------------------------------------------------
# Model resolution: hub ids, the converted cache, precision per backend


def fake_hub(root: Path, repo: str, source: Path) -> Path:
    """Put ``source`` in a Hugging Face cache at ``root`` as ``repo``'s main revision; returns the snapshot."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    base = root / f"models--{repo.replace('/', '--')}"
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in source.iterdir():
        (snap / f.name).symlink_to(f)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(commit)
    return snap


@pytest.fixture
def hub(monkeypatch, tmp_path):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "hub"


def test_raw_hub_checkpoint_is_converted_once(hub, chat_model_dir, chat_model, monkeypatch):
    fake_hub(hub, "test/tiny", chat_model_dir)
    said = []
    p = planning.plan("test/tiny", metal=False, say=said.append)  # auto on a CPU
    cached = planning.cache_root() / "test--tiny-float32"  # the source is float32: kept losslessly
    assert (p.folder, p.precision, p.dtype, p.quantize_bits, p.notes) == (
        cached, "float32", mx.float32, None, (planning.CPU_NOTE,)
    )
    assert said == [f"converting test/tiny to float32 into {cached} (once; later runs reuse it)"]

    convert_module = importlib.import_module("mlx_qwen35.convert")
    monkeypatch.setattr(convert_module, "convert", lambda *a, **k: pytest.fail("converted again"))
    again = planning.plan("test/tiny", "float32", metal=False, say=said.append)
    assert again.folder == cached and len(said) == 1
    model = planning.build(again)
    ids = mx.array([[1, 50, 7000, 248045, 12]])
    assert rel_err(model(ids), chat_model[0](ids)) < 1e-6


def test_auto_is_4bit_on_an_apple_gpu(hub, chat_model_dir, monkeypatch):
    fake_hub(hub, "test/tiny", chat_model_dir)
    p = planning.plan("test/tiny", metal=True)
    assert p.folder == planning.cache_root() / "test--tiny-4bit" and p.precision == "4bit"
    config = json.loads((p.folder / "config.json").read_text())
    assert config["quantization"]["bits"] == 4
    assert p.quantize_bits is None and p.dtype is None and p.notes == ()  # stored quantized: runs as is
    # the quantized checkpoint, used as a local folder
    assert planning.plan(str(p.folder), metal=True).precision == "4bit"
    on_cpu = planning.plan(str(p.folder), metal=False)
    assert on_cpu.dtype == mx.float32 and "is quantized" in on_cpu.notes[-1]
    with pytest.raises(Qwen35Error, match="already quantized to 4 bits"):
        planning.plan(str(p.folder), "8bit", metal=True)
    # a raw local folder is quantized in memory
    local = planning.plan(str(chat_model_dir), "8bit", metal=False)
    assert (local.folder, local.quantize_bits, local.dtype) == (chat_model_dir, 8, None)
    with pytest.raises(Qwen35Error, match="--precision: 'int3' is not one of"):
        planning.plan(str(chat_model_dir), "int3")


def test_mlx_hub_repo_is_used_as_downloaded(hub, chat_model_dir, tmp_path):
    from mlx_qwen35.convert import convert

    convert(chat_model_dir, tmp_path / "ours", dtype="bfloat16")
    snap = fake_hub(hub, "test/ours-bf16", tmp_path / "ours")
    said = []
    p = planning.plan("test/ours-bf16", "bfloat16", metal=False, say=said.append)
    assert p.folder == snap and p.dtype == mx.bfloat16 and said == []
    assert not planning.cache_root().exists()


# ---------------------------------------------------------------------------------------------
# Memory figures (info)


def measured(model, kv_bits, n=256) -> tuple[float, int]:
    """KV bytes per token and recurrent+conv state bytes, read off a cache after prefilling ``n`` tokens."""
    cache = model.make_cache(kv_bits)
    prefill(model, list(range(1000, 1000 + n)), cache)  # 256: a whole number of the caches' allocation steps

    def arrays(c):
        return [a for _, a in tree_flatten(c.state) if isinstance(a, mx.array)]

    kv = sum(a.nbytes for c in cache if not isinstance(c, ArraysCache) for a in arrays(c))
    state = sum(a.nbytes for c in cache if isinstance(c, ArraysCache) for a in arrays(c))
    return kv / n, state


@pytest.mark.parametrize("precision", ["float32", "bfloat16", "4bit"])
def test_footprint_matches_a_real_cache(chat_model_dir, precision):
    plan = planning.plan(str(chat_model_dir), precision, metal=False)
    fp = memory.footprint(planning.build(plan, lazy=True))
    model = planning.build(plan)
    assert fp.weights["text"] == sum(w.nbytes for _, w in tree_flatten(model.language_model.parameters()))
    assert fp.weights["vision"] == sum(w.nbytes for _, w in tree_flatten(model.visual.parameters()))
    for kv_bits in (None, 8, 4):
        kv, state = measured(model, kv_bits)
        assert fp.kv_per_token[kv_bits] == kv and fp.state == state
    room = fp.weights["text"] + fp.state
    assert fp.longest_context(room + 1000 * fp.kv_per_token[None]) == 1000
    assert fp.longest_context(room + 1000 * fp.kv_per_token[4] + 1, kv_bits=4) == 1000
    assert fp.longest_context(room // 2) == 0
    assert fp.longest_context(1 << 50) == 4096  # the model's context


def test_info_command(chat_model_dir):
    r = invoke("info", chat_model_dir)
    assert r.exit_code == 0, r.stderr
    fp = memory.footprint(planning.build(planning.plan(str(chat_model_dir), metal=mx.metal.is_available()), lazy=True))
    available, source = memory.available_memory()
    assert 0 < available <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") or mx.metal.is_available()
    assert f"({source})" in r.stdout
    for bits, label in ((None, "float32"), (8, "--kv-bits 8"), (4, "--kv-bits 4")):
        row = next(line for line in r.stdout.splitlines() if line.strip().startswith(label + " "))
        assert f"{fp.kv_per_token[bits] / 1024:.2f} KiB" in row and "(the model's limit)" in row
    assert f"{fp.state / 2**20:.1f} MiB per conversation (3 Gated DeltaNet layers)" in r.stdout


def test_generate_with_images_and_a_video(loaded, chat_model_dir, tmp_path):
    from PIL import Image

    model, tok = loaded
    rng = np.random.default_rng(0)
    img = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(img)
    frames = tmp_path / "clip"
    frames.mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(frames / f"{i}.png")
    r = invoke("generate", "--model", chat_model_dir, "-p", "What is this?", "--image", img, "--video", frames,
               "--temp", "0", "--max-tokens", 6, "--json")
    assert r.exit_code == 0, r.stderr
    api = mlx_qwen35.generate(model, tok, "What is this?", images=[img], videos=[frames],
                              sampling=greedy("instruct"), max_tokens=6)
    data = json.loads(r.stdout)
    assert data["text"] == api.text and data["stats"]["prompt_tokens"] == api.prompt_tokens
    text_only = mlx_qwen35.generate(model, tok, "What is this?", sampling=greedy("instruct"), max_tokens=1)
    assert api.prompt_tokens > text_only.prompt_tokens + 10  # the merged image and video tokens
    (tmp_path / "notes.txt").write_text("words")
    line = one_error_line(invoke("generate", "--model", chat_model_dir, "-p", "hi", "--image", tmp_path / "notes.txt"))
    assert f"{tmp_path / 'notes.txt'}" in line


def test_a_template_that_cannot_place_images_says_so(loaded, chat_model_dir, tmp_path):
    from PIL import Image

    img = tmp_path / "photo.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(img)
    text_only = tmp_path / "text_only.jinja"  # ChatML that writes only the text of a message
    text_only.write_text(
        "{% for m in messages %}<|im_start|>{{ m.role }}\n"
        "{% if m.content is string %}{{ m.content }}{% else %}{% for c in m.content %}"
        "{% if c.type == 'text' %}{{ c.text }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    line = one_error_line(invoke("generate", "--model", chat_model_dir, "-p", "What is this?", "--image", img,
                                 "--chat-template", text_only))
    assert line == (
        "error: prompt: 0 <|image_pad|> placeholder(s) but 1 image(s) given: the chat template wrote none, "
        "so it cannot place images; pass one that can with --chat-template"
    )
