"""Folders in the formats mlx-community ships (written by mlx-lm's and mlx-vlm's own converters), and our
own float-format and vision-tower quantizations, against the bounds the README states.

Quantization error is measured on calm tiny models (transformers' own initialisation), as in
test_parity.py; tolerances are relative Frobenius errors over all logits (conftest.rel_err).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from checkpoints import TEXT, VISION, build_hf_checkpoint, write_tiny_tokenizer
from conftest import HFCheckpoint, rel_err
from mlx_lm.models.cache import ArraysCache
from typer.testing import CliRunner

from mlx_qwen35 import memory
from mlx_qwen35.cli import app
from mlx_qwen35.convert import QuantSpec, convert
from mlx_qwen35.engine import prefill
from mlx_qwen35.loading import load_model

TOL = 1e-5

# what mlx-community's Qwen3.5 folders hold, as their converters' arguments
FORMATS = {
    "bf16": dict(dtype="bfloat16"),
    "4bit": dict(quantize=True, q_bits=4, q_group_size=64, dtype="bfloat16"),
    "8bit": dict(quantize=True, q_bits=8, q_group_size=64, dtype="bfloat16"),
    "mxfp4": dict(quantize=True, q_mode="mxfp4", q_bits=4, q_group_size=32, dtype="bfloat16"),
}
# README "The command line": run as stored (bf16), our logits against mlx-lm's on the same folder
AS_STORED = 0.03
# README "Quantization policy": our conversions against the float model
OUR_FORMATS = {"mxfp4": 0.10, "nvfp4": 0.09, "mxfp8": 0.06}
VISION_4BIT = 0.25


@pytest.fixture(scope="module")
def calm_vl(tmp_path_factory) -> HFCheckpoint:
    path = tmp_path_factory.mktemp("calm_vl")
    model = build_hf_checkpoint(path, text=TEXT, vision=VISION, hf_init=True)
    write_tiny_tokenizer(path)
    return HFCheckpoint(path, model)


def logits(model, ids) -> np.ndarray:
    return np.array(model(mx.array(ids)).astype(mx.float32))


def converted(writer: str, src, out, **kw):
    if writer == "mlx-lm":
        from mlx_lm import convert as their_convert
    else:
        from mlx_vlm import convert as their_convert
    their_convert(str(src), str(out), **kw)
    return out


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("writer", ["mlx-lm", "mlx-vlm"])
def test_mlx_community_folder_gives_mlx_lm_logits(calm_vl, token_ids, tmp_path, writer, fmt):
    from mlx_lm import load as mlx_lm_load

    folder = converted(writer, calm_vl.path, tmp_path / "out", **FORMATS[fmt])
    ours = load_model(folder)
    assert hasattr(ours, "visual") == (writer == "mlx-vlm")  # mlx-lm drops the tower
    theirs, _ = mlx_lm_load(str(folder))
    a, b = ours(mx.array(token_ids)), theirs(mx.array(token_ids))
    assert a.dtype == b.dtype == mx.bfloat16
    assert rel_err(np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))) < AS_STORED
    # in float32 (what a CPU runs) the two read the folder into the very same numbers
    theirs.set_dtype(mx.float32)
    assert rel_err(logits(load_model(folder, dtype=mx.float32), token_ids), logits(theirs, token_ids)) < TOL


@pytest.mark.parametrize("writer", ["mlx-lm", "mlx-vlm"])
def test_float32_mxfp4_folder_runs_in_float32(calm_vl, token_ids, tmp_path, writer):
    # mxfp4 scales are uint8: nothing in the quantized layers says the folder is float32
    from mlx_lm import load as mlx_lm_load

    folder = converted(writer, calm_vl.path, tmp_path / "out", **dict(FORMATS["mxfp4"], dtype="float32"))
    ours, (theirs, _) = load_model(folder), mlx_lm_load(str(folder))
    out = ours(mx.array(token_ids))
    assert out.dtype == mx.float32
    assert rel_err(np.array(out), logits(theirs, token_ids)) < TOL
    # what `info` plans for it: float32 KV, as a real cache holds
    fp = memory.footprint(load_model(folder, lazy=True))
    cache = ours.make_cache()
    prefill(ours, list(range(100, 356)), cache)
    kv = sum(a.nbytes for c in cache if not isinstance(c, ArraysCache) for a in c.state.values())
    assert fp.compute_dtype == mx.float32 and fp.kv_per_token[None] == kv / 256


@pytest.mark.parametrize("mode", OUR_FORMATS)
def test_our_float_format_conversions(hf_calm, token_ids, tmp_path, mode):
    convert(hf_calm.path, tmp_path / "f32", dtype="float32")
    convert(hf_calm.path, tmp_path / "q", dtype="float32", quantize_spec=QuantSpec(mode=mode))
    q = load_model(tmp_path / "q")
    assert q.language_model.layers[0].mlp.up_proj.mode == mode
    out = q(mx.array(token_ids))
    assert out.dtype == mx.float32
    err = rel_err(np.array(out), logits(load_model(tmp_path / "f32"), token_ids))
    assert 0 < err < OUR_FORMATS[mode]


def test_quantize_vision_converts_and_runs_the_tower(calm_vl, tmp_path):
    runner = CliRunner()
    for name, flags in (("q", []), ("qv", ["--quantize-vision"])):
        args = ["convert", "--hf-path", calm_vl.path, "--mlx-path", tmp_path / name, "-q", "--dtype", "float32", *flags]
        r = runner.invoke(app, [str(a) for a in args])
        assert r.exit_code == 0, r.output
    float_tower = load_model(calm_vl.path)
    q, qv = load_model(tmp_path / "q"), load_model(tmp_path / "qv")
    quantized = lambda m: [p for p, x in m.visual.named_modules() if isinstance(x, nn.QuantizedLinear)]
    linears = [p for p, x in float_tower.visual.named_modules() if isinstance(x, nn.Linear)]
    assert quantized(q) == [] and sorted(quantized(qv)) == sorted(linears)
    grid = np.array([[1, 8, 12]])
    pixels = np.random.default_rng(0).standard_normal((96, 3 * 2 * 16 * 16)).astype(np.float32)
    ref = np.array(float_tower.encode_vision(pixels, grid))
    assert rel_err(np.array(q.encode_vision(pixels, grid)), ref) < TOL
    assert 0 < rel_err(np.array(qv.encode_vision(pixels, grid)), ref) < VISION_4BIT
