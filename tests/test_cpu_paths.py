"""The text model's CPU numerics (mlx_qwen35.ops.cpu, .linear) against float64 references.

- The projections ``ops.prepare`` swaps in: half-precision weights multiplied in float32, quantized ones
  dequantized in blocks (every affine bit width, every group size): within the
  bfloat16 rounding of the output (4e-3 of the largest entry) of the exact
  product of the activations with the dequantized weights; float32 weights
  bit-identical to the layer's own call past ``GEMV_ROWS`` rows, and up to
  it (decode) through the gemv route (our kernel, else numpy's BLAS) within
  the float32 rounding bound of the exact product, as the layer's own call is.
- The activations (exp through a polynomial and the float's exponent bits):
  relative error 1e-6 per element over the whole float range, with exact
  limits (0 below the smallest normal, 1 above it), and masked keys carrying
  exactly zero weight in the softmax.
- ``cpu_attention``: causal prefill in query blocks (more than one, after a
  cached past), grouped query heads and decode, relative error 1e-5.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import spy

from mlx_qwen35 import ops
from mlx_qwen35.errors import Qwen35Error
from mlx_qwen35.loading import load_model
from mlx_qwen35.ops import cpu, linear
from mlx_qwen35.ops.dispatch import ENV_GEMV, ENV_NATIVE, ENV_PORTABLE, GEMV_ROWS, gemv_route

f32 = mx.float32


def f64(x: mx.array) -> np.ndarray:
    return np.array(x.astype(f32), dtype=np.float64)


def exact_product(x: mx.array, w: np.ndarray, bias) -> np.ndarray:
    out = f64(x) @ w.T
    return out if bias is None else out + f64(bias)


@pytest.mark.parametrize("bits, group_size", [(2, 32), (3, 64), (4, 64), (5, 128), (6, 64), (8, 128)])
def test_project_quantized(bits, group_size):
    mx.random.seed(bits * group_size)
    lin = nn.Linear(256, 700, bias=True)
    lin.set_dtype(mx.bfloat16)
    q = nn.QuantizedLinear.from_linear(lin, group_size=group_size, bits=bits)
    w = f64(mx.dequantize(q.weight, q.scales.astype(f32), q.biases.astype(f32), group_size=group_size, bits=bits))
    for rows in (1, 5):
        x = mx.random.normal((2, rows, 256)).astype(mx.bfloat16)
        y = ops.prepare(q)(x)
        assert y.shape == (2, rows, 700) and y.dtype == mx.bfloat16
        ref = exact_product(x, w, q.bias)
        assert np.abs(f64(y) - ref).max() <= 4e-3 * np.abs(ref).max()


def test_project_quantized_head_blocks(monkeypatch):
    """Many row blocks (the output head's case), each after the last."""
    monkeypatch.setattr(linear, "BLOCK_ELEMS", 128 * 64)
    e = nn.QuantizedEmbedding.from_embedding(nn.Embedding(1000, 128), group_size=64, bits=6)
    w = f64(mx.dequantize(e.weight, e.scales, e.biases, group_size=64, bits=6))
    h = mx.random.normal((1, 128))
    ref = f64(h) @ w.T
    assert np.linalg.norm(f64(ops.prepare(e).as_linear(h)) - ref) / np.linalg.norm(ref) < 1e-6


@pytest.mark.parametrize("rows", [1, linear.HALF_BLAS_ROWS + 1])
def test_project_half_precision(rows):
    lin = nn.Linear(300, 1100, bias=True)
    lin.set_dtype(mx.bfloat16)
    x = mx.random.normal((1, rows, 300)).astype(mx.bfloat16)
    y = ops.prepare(lin)(x)
    assert y.shape == (1, rows, 1100) and y.dtype == mx.bfloat16
    ref = exact_product(x, f64(lin.weight), lin.bias)
    assert np.abs(f64(y) - ref).max() <= 4e-3 * np.abs(ref).max()


def test_project_float32_is_the_layer(monkeypatch):
    """Past GEMV_ROWS rows (prefill), or with the gemv route switched off, MLX's own matmul."""
    lin = nn.Linear(64, 48, bias=True)
    emb = nn.Embedding(50, 64)
    for rows, switch in ((GEMV_ROWS + 1, ""), (1, "0")):
        monkeypatch.setenv(ENV_GEMV, switch)
        x = mx.random.normal((rows, 64))
        assert mx.array_equal(ops.prepare(lin)(x), lin(x)).item()
        assert mx.array_equal(ops.prepare(emb).as_linear(x), emb.as_linear(x)).item()


def within_float32_rounding(y: mx.array, x: mx.array, w: mx.array, bias) -> bool:
    """|y - x wᵀ - b| <= (K + 1) u (|x| |w|ᵀ + |b|) per entry, float32's rounding bound for a K-term sum."""
    exact = exact_product(x, f64(w), bias)
    scale = np.abs(f64(x)) @ np.abs(f64(w)).T + (0 if bias is None else np.abs(f64(bias)))
    return bool((np.abs(f64(y) - exact) <= (x.shape[-1] + 1) * 2.0**-24 * scale).all())


@pytest.mark.parametrize("route", ["native", "numpy"])
@pytest.mark.parametrize("K, N", [(64, 48), (2048, 3000)])
@pytest.mark.parametrize("rows", [1, linear.ROW_BY_ROW, GEMV_ROWS])
def test_project_float32_decode_through_the_gemv_route(monkeypatch, K, N, rows, route):
    """Decode's few rows take the gemv route; its numbers are the matmul's it replaces, within float32 rounding."""
    monkeypatch.delenv(ENV_GEMV, raising=False)
    monkeypatch.setenv(ENV_NATIVE, "1" if route == "native" else "0")
    if route == "native" and not ops.native.available():
        pytest.skip("the native kernel could not be compiled here")
    mx.random.seed(K + rows)
    calls = spy(monkeypatch, linear, "gemv_product")
    lin, emb = nn.Linear(K, N, bias=True), nn.Embedding(N, K)
    x = mx.random.normal((1, rows, K))
    for layer, y, native in (
        (lin, ops.prepare(lin)(x), lin(x)),
        (emb, ops.prepare(emb).as_linear(x), emb.as_linear(x)),
    ):
        assert y.shape == native.shape == (1, rows, N) and y.dtype == mx.float32
        bias = layer.bias if "bias" in layer else None
        assert within_float32_rounding(y, x, layer.weight, bias)
        assert within_float32_rounding(native, x, layer.weight, bias)
    expected = "numpy" if rows == 1 else route  # one float32 row: numpy's gemv either way
    assert [call[2] for call in calls] == [expected, expected]


def test_project_float32_decode_under_compile_and_vmap(monkeypatch):
    """Transformations cannot evaluate mid-graph: there the layer runs MLX's own matmul."""
    monkeypatch.delenv(ENV_GEMV, raising=False)
    lin = nn.Linear(64, 48, bias=True)
    ours = ops.prepare(lin)
    x = mx.random.normal((1, 1, 64))
    assert mx.array_equal(mx.compile(ours)(x), lin(x)).item()
    assert mx.array_equal(mx.vmap(ours)(mx.stack([x, x])), mx.vmap(lin)(mx.stack([x, x]))).item()


def test_the_gemv_switch(monkeypatch):
    monkeypatch.delenv(ENV_PORTABLE, raising=False)
    monkeypatch.delenv(ENV_GEMV, raising=False)
    monkeypatch.setenv(ENV_NATIVE, "0")
    assert gemv_route(1, mx.float32) == gemv_route(GEMV_ROWS, mx.float32) == "numpy"
    assert gemv_route(GEMV_ROWS + 1, mx.float32) is None
    # half and quantized weights: numpy has no bfloat16 product
    assert gemv_route(1, mx.bfloat16) is gemv_route(1, mx.float16) is gemv_route(1, mx.uint32) is None
    monkeypatch.setenv(ENV_GEMV, "0")
    assert gemv_route(1, mx.float32) is None
    monkeypatch.setenv(ENV_GEMV, "1")
    assert gemv_route(1, mx.float32) == "numpy"
    monkeypatch.setenv(ENV_PORTABLE, "1")
    assert gemv_route(1, mx.float32) is None
    monkeypatch.setenv(ENV_GEMV, "yes")
    with pytest.raises(Qwen35Error, match=f"{ENV_GEMV}='yes': expected 1"):
        gemv_route(1, mx.float32)


def test_the_native_switch(monkeypatch):
    """Our kernel takes float32 and bfloat16 weights where it compiled, unless MLX_QWEN35_NATIVE=0."""
    if not ops.native.available():
        pytest.skip("the native kernel could not be compiled here")
    monkeypatch.delenv(ENV_PORTABLE, raising=False)
    monkeypatch.delenv(ENV_GEMV, raising=False)
    monkeypatch.delenv(ENV_NATIVE, raising=False)
    assert gemv_route(2, mx.float32) == gemv_route(1, mx.bfloat16) == gemv_route(GEMV_ROWS, mx.bfloat16) == "native"
    assert gemv_route(1, mx.float32) == "numpy"  # one float32 row: numpy's gemv is the faster
    assert gemv_route(GEMV_ROWS + 1, mx.bfloat16) is gemv_route(1, mx.float16) is gemv_route(1, mx.uint32) is None
    monkeypatch.setenv(ENV_GEMV, "0")
    assert gemv_route(1, mx.bfloat16) is None
    monkeypatch.setenv(ENV_GEMV, "1")
    monkeypatch.setenv(ENV_NATIVE, "0")
    assert gemv_route(1, mx.float32) == "numpy" and gemv_route(1, mx.bfloat16) is None
    monkeypatch.setenv(ENV_NATIVE, "yes")
    with pytest.raises(Qwen35Error, match=f"{ENV_NATIVE}='yes': expected 1"):
        gemv_route(2, mx.float32)


def projections(module: nn.Module) -> list[type]:
    kinds = (nn.Linear, nn.QuantizedLinear, nn.Embedding, nn.QuantizedEmbedding)
    return [type(m) for _, m in module.named_modules() if isinstance(m, kinds)]


def test_the_loader_swaps_in_every_projection(hf_bf16, monkeypatch):
    """Every text Linear and the tied output head, and what a later quantization makes of them;
    not the vision tower, and nothing in portable mode."""
    monkeypatch.delenv(ENV_PORTABLE, raising=False)
    model = load_model(hf_bf16.path, lazy=True)
    lm = model.language_model
    assert lm.cfg.tie_word_embeddings and type(lm.embed_tokens) is linear.Embedding
    assert set(projections(lm)) == {linear.Linear, linear.Embedding}
    assert set(projections(model.visual)) == {nn.Linear, nn.Embedding}  # the position table
    nn.quantize(lm, group_size=32, bits=4)  # as an in-memory quantization after loading does
    assert set(projections(lm)) == {linear.QuantizedLinear, linear.QuantizedEmbedding}
    monkeypatch.setenv(ENV_PORTABLE, "1")
    assert set(projections(load_model(hf_bf16.path, lazy=True).language_model)) == {nn.Linear, nn.Embedding}


# Every result here is a normal float32; beyond, results are exact limits.
GRID = np.linspace(-87, 87, 400_001).astype(np.float32)
BEYOND = np.array([-np.inf, -1e30, -100, -88, 88, 100, 1e30, np.inf], np.float32)


def sigmoid64(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


def max_rel_err(ours: mx.array, ref: np.ndarray) -> float:
    return float((np.abs(f64(ours) - ref) / np.abs(ref)).max())


def test_sigmoid_mul():
    u = np.linspace(-3, 3, GRID.size).astype(np.float32)
    u[u == 0] = 1
    ref = sigmoid64(GRID) * u
    assert max_rel_err(cpu.sigmoid_mul(mx.array(GRID), mx.array(u)), ref) < 1e-6
    limits = cpu.sigmoid_mul(mx.array(BEYOND), mx.ones(BEYOND.shape))
    assert f64(limits).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


def test_swiglu():
    x = GRID[GRID != 0]
    ref = x * sigmoid64(x) * 0.5
    assert max_rel_err(cpu.swiglu(mx.array(x), mx.full(x.shape, 0.5)), ref) < 1e-6
    finite = BEYOND[np.isfinite(BEYOND)]
    limits = f64(cpu.swiglu(mx.array(finite), mx.full(finite.shape, 0.5)))
    assert limits.tolist() == np.where(finite > 0, finite.astype(np.float64) * 0.5, 0).tolist()


def test_activations_past_the_kept_shapes():
    # More shapes than the compiled kernels kept: evicted shapes compile
    # again and give the same numbers.
    rng = np.random.default_rng(1)
    shapes = [(1, t, 24) for t in range(1, cpu._SHAPES_KEPT + 6)] + [(1, 1, 24), (1, 2, 24)]
    for shape in shapes:
        x = (rng.standard_normal(shape) * 8).astype(np.float32)
        u = rng.standard_normal(shape).astype(np.float32)
        ref = x * sigmoid64(x) * u
        assert max_rel_err(cpu.swiglu(mx.array(x), mx.array(u)), ref) < 1e-6, shape
        assert max_rel_err(cpu.sigmoid_mul(mx.array(x), mx.array(u)), sigmoid64(x) * u) < 1e-6, shape


def test_softmax_with_masked_keys():
    rng = np.random.default_rng(0)
    s = (rng.standard_normal((3, 5, 300)) * 30).astype(np.float32)
    s[..., 200:] = -np.inf
    ref = np.exp(s - s.max(-1, keepdims=True))
    ref /= ref.sum(-1, keepdims=True)
    p = f64(cpu.softmax(mx.array(s)))
    assert np.all(p[..., 200:] == 0)
    live = ref > 1e-30
    assert (np.abs(p - ref)[live] / ref[live]).max() < 1e-6


def attention64(q, k, v, scale):
    """Plain float64 causal attention; queries are the last L of S positions."""
    q, k, v = (np.array(a, np.float64) for a in (q, k, v))
    B, H, L, D = q.shape
    S, rep = k.shape[2], H // k.shape[1]
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    s = q @ k.swapaxes(-1, -2) * scale
    s[..., np.arange(S)[None] > (S - L + np.arange(L))[:, None]] = -np.inf
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


@pytest.mark.parametrize("L, past", [(1, 40), (3 * cpu.ATTENTION_BLOCK - 5, 0), (cpu.ATTENTION_BLOCK + 7, 33)])
def test_cpu_attention(L, past):
    rng = np.random.default_rng(L)
    q = mx.array(rng.standard_normal((2, 4, L, 32)).astype(np.float32))
    k, v = (mx.array(rng.standard_normal((2, 2, past + L, 32)).astype(np.float32)) for _ in range(2))
    out = cpu.cpu_attention(q, k, v, 32**-0.5, causal=L > 1)
    ref = attention64(q, k, v, 32**-0.5)
    assert np.linalg.norm(f64(out) - ref) / np.linalg.norm(ref) < 1e-5
