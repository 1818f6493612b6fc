"""The converter: output layout, precision policy, atomic writes, bad input."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from typer.testing import CliRunner

from mlx_qwen35.cli import app
from mlx_qwen35.convert import QuantSpec, convert
from mlx_qwen35.errors import Qwen35Error

runner = CliRunner()


def read_all(folder: Path) -> dict[str, mx.array]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    out = {}
    for f in sorted(set(index["weight_map"].values())):
        out.update(mx.load(str(folder / f)))
    assert set(out) == set(index["weight_map"])
    return out


def hf_tensors(folder: Path) -> dict[str, mx.array]:
    out = {}
    for f in folder.glob("*.safetensors"):
        out.update(mx.load(str(f)))
    return out


def test_bf16_output_layout_and_precision(hf_bf16, tmp_path):
    out = tmp_path / "out"
    summary = convert(hf_bf16.path, out)
    w = read_all(out)
    src = hf_tensors(hf_bf16.path)
    # vision and MTP kept, tied head not duplicated
    assert any(k.startswith("visual.") for k in w)
    assert any(k.startswith("mtp.") for k in w)
    assert not any("lm_head" in k for k in w)
    assert set(summary.parts) == {"language_model", "visual", "mtp"}
    # layouts
    assert w["language_model.layers.0.linear_attn.conv1d.weight"].shape[-1] == 1
    assert w["visual.patch_embed.proj.weight"].ndim == 2
    # the +1 shift, done in float32 and kept there
    n = "language_model.layers.0.input_layernorm.weight"
    assert w[n].dtype == mx.float32
    assert mx.array_equal(w[n], src["model." + n].astype(mx.float32) + 1.0)
    # not shifted: the gated norm (float32 in the source too) and the vision LayerNorms
    g = "language_model.layers.0.linear_attn.norm.weight"
    assert w[g].dtype == mx.float32 and mx.array_equal(w[g], src["model." + g])
    assert mx.array_equal(w["visual.blocks.0.norm1.weight"], src["model.visual.blocks.0.norm1.weight"])
    assert w["mtp.norm.weight"].dtype == mx.float32
    assert mx.array_equal(w["mtp.norm.weight"], src["mtp.norm.weight"].astype(mx.float32) + 1.0)
    # A_log float32; big matrices bf16
    assert w["language_model.layers.0.linear_attn.A_log"].dtype == mx.float32
    assert w["language_model.layers.0.mlp.up_proj.weight"].dtype == mx.bfloat16
    # side files copied byte for byte, config marked
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (hf_bf16.path / name).read_bytes()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["mlx_qwen35"] == {"format_version": 1, "dtype": "bfloat16"}
    assert "quantization" not in cfg
    # nothing left behind next to the output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_quantization_policy(hf_text, tmp_path):
    convert(hf_text.path, tmp_path / "q", dtype="float32", quantize_spec=QuantSpec(bits=4, group_size=64))
    w = read_all(tmp_path / "q")
    q = json.loads((tmp_path / "q" / "config.json").read_text())["quantization"]
    assert {k: q[k] for k in ("bits", "group_size", "mode")} == {"bits": 4, "group_size": 64, "mode": "affine"}

    def bits(layer):
        # affine packs 32 / bits values per uint32
        weight, scales = w[f"{layer}.weight"], w[f"{layer}.scales"]
        return 32 * weight.shape[-1] // (scales.shape[-1] * 64)

    L = "language_model.layers"
    assert bits(f"{L}.0.mlp.up_proj") == 4
    assert bits(f"{L}.0.linear_attn.in_proj_qkv") == 4
    assert bits(f"{L}.0.linear_attn.out_proj") == 8
    assert bits(f"{L}.3.self_attn.q_proj") == 8
    assert bits("language_model.embed_tokens") == 6
    assert q[f"{L}.0.linear_attn.out_proj"]["bits"] == 8
    for never in ("in_proj_a", "in_proj_b", "conv1d"):
        assert f"{L}.0.linear_attn.{never}.scales" not in w
        assert w[f"{L}.0.linear_attn.{never}.weight"].dtype == mx.float32
    for small in ("A_log", "dt_bias", "norm.weight"):
        assert w[f"{L}.0.linear_attn.{small}"].dtype == mx.float32


def test_float_quant_modes_upgrade_sensitive_layers(hf_text, tmp_path):
    convert(hf_text.path, tmp_path / "q", dtype="float32", quantize_spec=QuantSpec(mode="mxfp4"))
    q = json.loads((tmp_path / "q" / "config.json").read_text())["quantization"]
    assert q["mode"] == "mxfp4" and q["bits"] == 4 and q["group_size"] == 32
    assert q["language_model.layers.0.linear_attn.out_proj"] == {"group_size": 32, "bits": 8, "mode": "mxfp8"}


def test_refuses_to_overwrite_without_force(hf_text, tmp_path):
    out = tmp_path / "out"
    convert(hf_text.path, out, dtype="float32")
    (out / "keep.txt").write_text("mine")
    with pytest.raises(Qwen35Error, match="already exists; pass --force"):
        convert(hf_text.path, out, dtype="float32")
    assert (out / "keep.txt").read_text() == "mine"
    convert(hf_text.path, out, dtype="float32", force=True)  # one of our conversions: replaced
    assert not (out / "keep.txt").exists()
    assert (out / "config.json").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    convert(hf_text.path, empty, dtype="float32", force=True)
    assert (empty / "config.json").is_file()


def test_force_replaces_only_our_conversions(hf_text, tmp_path, monkeypatch):
    src = copy_ckpt(hf_text.path, tmp_path / "models" / "ckpt")
    before = sorted(p.name for p in src.iterdir())
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    also_mine = tmp_path / "file.txt"
    also_mine.write_text("mine")
    ours_around_src = copy_ckpt(hf_text.path, tmp_path / "ours")
    convert(hf_text.path, tmp_path / "conv", dtype="float32")
    shutil.copy(tmp_path / "conv" / "config.json", ours_around_src / "config.json")  # marked as ours, holds the source
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "report.txt").write_text("mine")
    monkeypatch.chdir(tmp_path / "work")
    for out, source, expected in [
        (tmp_path / "models", src, "contains the checkpoint being converted"),  # the parent of the source
        (src, src, "contains the checkpoint being converted"),  # the source itself
        (Path("."), src, "not a conversion written by mlx_qwen35"),  # the current folder
        (mine, src, "not a conversion written by mlx_qwen35"),
        (also_mine, src, "not a conversion written by mlx_qwen35"),
        (ours_around_src, ours_around_src / ".." / "ours", "contains the checkpoint being converted"),
    ]:
        with pytest.raises(Qwen35Error, match=expected) as e:
            convert(source, out, dtype="float32", force=True)
        assert str(e.value).startswith(f"--mlx-path {Path(out).absolute()}: ")
    assert sorted(p.name for p in src.iterdir()) == before
    assert (mine / "notes.txt").read_text() == "mine" and also_mine.read_text() == "mine"
    assert (tmp_path / "work" / "report.txt").read_text() == "mine"
    msg = cli_error(["convert", "--hf-path", str(src), "--mlx-path", str(tmp_path / "models"), "--force"])
    assert "contains the checkpoint being converted" in msg and sorted(p.name for p in src.iterdir()) == before


def test_interrupted_conversion_leaves_nothing(hf_text, tmp_path):
    def interrupt(done, total, name):
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(hf_text.path, tmp_path / "out", dtype="float32", progress=interrupt)
    assert list(tmp_path.iterdir()) == []


STOPPED = """
import os, signal, sys
from mlx_qwen35.convert import convert

# As from a terminal: a test run started under nohup would pass SIGHUP on ignored.
signal.signal(signal.{signal}, signal.SIG_DFL)

def progress(done, total, name):
    if done == 3:  # mid-way through the shards, as a system shutting down would
        os.kill(os.getpid(), signal.{signal})

convert(sys.argv[1], sys.argv[2], dtype="float32", progress=progress)
"""


@pytest.mark.parametrize("name", ["SIGTERM", "SIGHUP"])
def test_conversion_stopped_by_a_signal_leaves_nothing(hf_text, tmp_path, name):
    import signal
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-c", STOPPED.format(signal=name), str(hf_text.path), str(tmp_path / "out")],
        cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 128 + getattr(signal, name), r.stderr  # exited, not killed
    assert list(tmp_path.iterdir()) == []


def test_stale_temporary_folders_of_dead_conversions_are_removed(hf_text, tmp_path):
    import os
    import subprocess
    import sys

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True).stdout)
    for name in (f".out.tmp-{dead}-x1", f".out.old-{dead}-x2", f".out.tmp-{os.getpid()}-x3", f".other.tmp-{dead}-x4"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"partial")
    convert(hf_text.path, tmp_path / "out", dtype="float32")
    # a live writer's folder stays, and so does another output's
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".other.tmp-{dead}-x4", f".out.tmp-{os.getpid()}-x3", "out"]


def test_cli_convert_prints_summary(hf_text, tmp_path):
    r = runner.invoke(
        app, ["convert", "--hf-path", str(hf_text.path), "--mlx-path", str(tmp_path / "o"), "-q", "--dtype", "float32"]
    )
    assert r.exit_code == 0, r.output
    assert "bits/weight" in r.output
    assert (tmp_path / "o" / "model.safetensors.index.json").is_file()


# ---- bad input: one clear line, non-zero exit, nothing written ----------------------------


def copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite_tensor(folder: Path, edit) -> None:
    """Load the model file, apply ``edit`` to the tensor dict, write it back (HF names)."""
    f = folder / "model.safetensors"
    w = dict(mx.load(str(f)))
    edit(w)
    mx.save_safetensors(str(f), w, metadata={"format": "pt"})
    index = folder / "model.safetensors.index.json"
    idx = json.loads(index.read_text())
    idx["weight_map"] = {k: v for k, v in idx["weight_map"].items() if v != "model.safetensors"}
    idx["weight_map"].update({k: "model.safetensors" for k in w})
    index.write_text(json.dumps(idx))


def cli_error(args) -> str:
    r = runner.invoke(app, args)
    assert r.exit_code != 0
    assert "Traceback" not in r.output
    return r.output


def convert_error(src: Path, out: Path) -> str:
    msg = cli_error(["convert", "--hf-path", str(src), "--mlx-path", str(out)])
    assert not out.exists()
    assert [p for p in out.parent.iterdir() if p.name.startswith(".")] == []
    return msg


def test_missing_config(hf_text, tmp_path):
    src = copy_ckpt(hf_text.path, tmp_path / "src")
    (src / "config.json").unlink()
    assert "config.json: not found" in convert_error(src, tmp_path / "out")


def test_other_architecture(hf_text, tmp_path):
    src = copy_ckpt(hf_text.path, tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "llama"
    (src / "config.json").write_text(json.dumps(cfg))
    assert "'model_type' is 'llama'" in convert_error(src, tmp_path / "out")


def test_missing_tensor(hf_text, tmp_path):
    src = copy_ckpt(hf_text.path, tmp_path / "src")
    rewrite_tensor(src, lambda w: w.pop("model.layers.1.mlp.up_proj.weight"))
    assert "lacks tensor 'language_model.layers.1.mlp.up_proj.weight'" in convert_error(src, tmp_path / "out")


def test_unexpected_tensor(hf_text, tmp_path):
    src = copy_ckpt(hf_text.path, tmp_path / "src")
    rewrite_tensor(src, lambda w: w.update({"model.layers.9.mlp.up_proj.weight": mx.zeros((4, 4))}))
    msg = convert_error(src, tmp_path / "out")
    assert "unexpected tensor 'language_model.layers.9.mlp.up_proj.weight'" in msg
    assert "model.safetensors" in msg


def test_wrong_shape_names_both_shapes(hf_text, tmp_path):
    src = copy_ckpt(hf_text.path, tmp_path / "src")
    rewrite_tensor(src, lambda w: w.update({"model.layers.0.mlp.up_proj.weight": mx.zeros((128, 63))}))
    msg = convert_error(src, tmp_path / "out")
    assert "'language_model.layers.0.mlp.up_proj.weight' has shape (128, 63), expected (128, 64)" in msg


def test_truncated_safetensors(hf_text, tmp_path):
    src = copy_ckpt(hf_text.path, tmp_path / "src")
    f = src / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    msg = convert_error(src, tmp_path / "out")
    assert "model.safetensors: truncated" in msg


def test_garbage_safetensors(hf_text, tmp_path):
    src = copy_ckpt(hf_text.path, tmp_path / "src")
    (src / "model.safetensors").write_bytes(struct.pack("<Q", 10) + b"not json!!")
    assert "not a valid safetensors file" in convert_error(src, tmp_path / "out")


def test_unwritable_output(hf_text, tmp_path, monkeypatch):
    # Tests may run as root, which ignores directory modes: fail the way the OS would.
    import tempfile

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", denied)
    msg = cli_error(["convert", "--hf-path", str(hf_text.path), "--mlx-path", str(tmp_path / "out")])
    assert f"{tmp_path}: cannot write here (Permission denied)" in msg
    assert not (tmp_path / "out").exists()


def test_output_path_is_a_file(hf_text, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert "cannot write here" in cli_error(
        ["convert", "--hf-path", str(hf_text.path), "--mlx-path", str(blocker / "out")]
    )


def test_bad_quantization_arguments(hf_text, tmp_path):
    msg = cli_error(["convert", "--hf-path", str(hf_text.path), "--mlx-path", str(tmp_path / "o"), "-q", "--q-bits", "7"])
    assert "--q-bits: 7" in msg


def test_hub_id_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    msg = cli_error(["convert", "--hf-path", "Qwen/Qwen3.5-2B", "--mlx-path", str(tmp_path / "o")])
    assert "Qwen/Qwen3.5-2B: could not fetch from the Hugging Face hub" in msg


def test_not_a_folder_nor_hub_id(tmp_path):
    msg = cli_error(["convert", "--hf-path", str(tmp_path / "nope"), "--mlx-path", str(tmp_path / "o")])
    assert "no such folder" in msg
