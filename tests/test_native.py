"""Our C kernel for decode's few rows (mlx_qwen35.ops.native) against numpy's float64 products.

- Every row count 1..8, K and N odd (the scalar tail, ragged tiles and
  thread slices), float32 and bfloat16 weights: each entry within the float32
  rounding bound of a K-term sum, (K + 1) u (|x| |w|ᵀ), u = 2⁻²⁴, of the
  float64 product of the same values (the bfloat16 weight widened exactly).
  The same bound tests/test_cpu_paths.py holds numpy's BLAS and MLX to.
- A tiny float32 model decodes the same greedy tokens with the kernel on and off.
- Without a compiler, or with ``MLX_QWEN35_NATIVE=0``, the route is numpy's.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import spy

from mlx_qwen35 import ops
from mlx_qwen35.generate import batch_generate
from mlx_qwen35.ops import linear, native
from mlx_qwen35.ops.dispatch import ENV_GEMV, ENV_NATIVE, ENV_PORTABLE, gemv_route
from mlx_qwen35.sampling import Sampling

needs_kernel = pytest.mark.skipif(not native.available(), reason="the native kernel could not be compiled here")


def widened(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bits as the float32 values they stand for (exact)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def within_float32_rounding(y: np.ndarray, x: np.ndarray, w: np.ndarray) -> bool:
    x, w = x.astype(np.float64), w.astype(np.float64)
    bound = (x.shape[-1] + 1) * 2.0**-24 * (np.abs(x) @ np.abs(w).T)
    return bool((np.abs(y - x @ w.T) <= bound).all())


@needs_kernel
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("K, N", [(2051, 3001), (7, 3), (8, 37)])
@pytest.mark.parametrize("rows", range(1, 9))
def test_kernel_against_float64(monkeypatch, rows, K, N, threads):
    monkeypatch.setattr(native, "_THREADS", threads)  # 3: a ragged split of 3001 rows
    rng = np.random.default_rng(rows * K + N)
    x = rng.standard_normal((rows, K), dtype=np.float32)
    w = rng.standard_normal((N, K), dtype=np.float32)
    bits = (w.view(np.uint32) >> 16).astype(np.uint16)  # bfloat16, truncated: any bits will do
    y32, y16 = native.matmul(x, w), native.matmul(x, bits)
    assert y32.shape == y16.shape == (rows, N) and y32.dtype == y16.dtype == np.float32
    assert within_float32_rounding(y32, x, w)
    assert within_float32_rounding(y16, x, widened(bits))


@needs_kernel
def test_kernel_takes_strided_inputs():
    """Views that are not C-contiguous are copied, not misread."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 200), dtype=np.float32)[:, ::2]
    w = rng.standard_normal((50, 100), dtype=np.float32).T[:60]  # [60, 50] with a stride of one element
    x = x[:, :50]
    assert within_float32_rounding(native.matmul(x, w), x, w)
    with pytest.raises(ValueError, match="expected"):
        native.matmul(np.zeros((9, 50), np.float32), w)


@needs_kernel
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_bfloat16_layer_through_the_kernel(monkeypatch, dtype):
    """A bfloat16 Linear at decode's rows reads its weight's bits in place; the output keeps x's dtype."""
    monkeypatch.delenv(ENV_NATIVE, raising=False)
    monkeypatch.delenv(ENV_GEMV, raising=False)
    calls = spy(monkeypatch, native, "matmul")
    lin = nn.Linear(515, 301, bias=True)
    lin.set_dtype(mx.bfloat16)
    x = mx.random.normal((2, 3, 515)).astype(dtype)
    y = ops.prepare(lin)(x)
    assert len(calls) == 1 and y.shape == (2, 3, 301) and y.dtype == dtype
    w = np.asarray(mx.view(lin.weight, mx.uint16))
    xs = np.array(x.astype(mx.float32)).reshape(6, 515)
    exact = xs.astype(np.float64) @ widened(w).astype(np.float64).T + np.array(lin.bias.astype(mx.float32))
    got = np.array(y.astype(mx.float32)).reshape(6, 301)
    # bfloat16 out: its rounding; float32 out: the sum's, then the bias's.
    tol = 2.0**-8 if dtype == mx.bfloat16 else 1e-5
    assert np.abs(got - exact).max() <= tol * np.abs(exact).max()


@needs_kernel
def test_greedy_decode_with_and_without_the_kernel(chat_model, monkeypatch):
    """Two sequences decoded as a batch: two rows a step, the kernel's case."""
    model, tok = chat_model
    monkeypatch.delenv(ENV_GEMV, raising=False)
    calls = spy(monkeypatch, native, "matmul")
    tokens, kernel_calls = {}, {}
    for switch in ("1", "0"):
        monkeypatch.setenv(ENV_NATIVE, switch)
        results = batch_generate(model, tok, ["Hello there", "Name a colour."], max_tokens=16,
                                 sampling=Sampling(temperature=0.0))
        tokens[switch] = [r.tokens for r in results]
        kernel_calls[switch] = len(calls) - sum(kernel_calls.values())
    assert kernel_calls["1"] > 0 and kernel_calls["0"] == 0
    assert [len(t) for t in tokens["1"]] == [16, 16] and tokens["1"] == tokens["0"]


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """An empty cache folder and a forgotten library, restored afterwards."""
    monkeypatch.setenv(native.ENV_CACHE, str(tmp_path))
    native._library.cache_clear()
    yield tmp_path
    native._library.cache_clear()


def test_without_a_compiler_numpy_runs(fresh_build, monkeypatch):
    monkeypatch.setenv("CC", str(fresh_build / "no-such-cc"))
    monkeypatch.delenv(ENV_NATIVE, raising=False)
    monkeypatch.delenv(ENV_GEMV, raising=False)
    monkeypatch.delenv(ENV_PORTABLE, raising=False)
    with pytest.warns(UserWarning, match="native decode kernel is unavailable"):
        assert not native.available()
    assert gemv_route(1, mx.float32) == "numpy" and gemv_route(1, mx.bfloat16) is None
    assert list(fresh_build.iterdir()) == []  # no temporary file left behind
    calls = spy(monkeypatch, linear, "gemv_product")
    lin = nn.Linear(40, 30)
    x = mx.random.normal((4, 40))
    y = ops.prepare(lin)(x)
    assert [call[2] for call in calls] == ["numpy"]
    exact = np.array(x, np.float64) @ np.array(lin.weight, np.float64).T + np.array(lin.bias)
    assert np.allclose(np.array(y), exact, rtol=1e-5, atol=1e-6)


def test_the_switch_turns_it_off(monkeypatch):
    monkeypatch.setenv(ENV_NATIVE, "0")
    monkeypatch.delenv(ENV_GEMV, raising=False)
    monkeypatch.delenv(ENV_PORTABLE, raising=False)
    calls = spy(monkeypatch, native, "matmul")
    lin = nn.Linear(40, 30)
    x = mx.random.normal((2, 40))
    assert mx.allclose(ops.prepare(lin)(x), lin(x), rtol=1e-5, atol=1e-6).item()
    assert gemv_route(2, mx.float32) == "numpy" and calls == []


@needs_kernel
def test_one_build_per_cache_folder(fresh_build):
    assert native.available()
    built = [p.name for p in fresh_build.iterdir()]
    assert len(built) == 1 and built[0].startswith("native-") and built[0].endswith(".so")
    native._library.cache_clear()
    assert native.available() and [p.name for p in fresh_build.iterdir()] == built  # loaded, not rebuilt


@needs_kernel
def test_a_forked_child_starts_its_own_workers(monkeypatch):
    """The parent's pool is started; the child has none of its threads, and must not wait on them."""
    import os
    import signal

    monkeypatch.setattr(native, "_THREADS", 2)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 2048), dtype=np.float32)
    w = rng.standard_normal((2048, 2048), dtype=np.float32)  # past one thread's share
    native.matmul(x, w)
    pid = os.fork()
    if pid == 0:  # the child: an alarm ends it if the product hangs
        signal.alarm(20)
        os._exit(0 if within_float32_rounding(native.matmul(x, w), x, w) else 1)
    assert os.waitpid(pid, 0)[1] == 0


@needs_kernel
def test_float32_run_of_a_bf16_checkpoint_keeps_bf16_weights_and_float32_numbers(hf_bf16, token_ids, tmp_path,
                                                                                 monkeypatch):
    """Its projections stay bfloat16 (half the bytes a token) and the kernel widens them exactly: token by token,
    the logits are transformers' float32 ones to the README's float32 tolerance."""
    from conftest import rel_err

    from mlx_qwen35.convert import convert
    from mlx_qwen35.loading import load_model

    monkeypatch.delenv(ENV_GEMV, raising=False)
    monkeypatch.delenv(ENV_NATIVE, raising=False)
    convert(hf_bf16.path, tmp_path / "out")
    model = load_model(tmp_path / "out", dtype=mx.float32)
    lm = model.language_model
    assert lm.dtype == mx.float32 and lm.embed_tokens.weight.dtype == lm.layers[0].mlp.up_proj.weight.dtype == mx.bfloat16
    assert lm.norm.weight.dtype == lm.layers[0].linear_attn.conv1d.weight.dtype == mx.float32
    calls = spy(monkeypatch, native, "matmul")
    ids = token_ids[:1, :12]
    cache = model.make_cache()
    steps = [np.array(model(mx.array(ids[:, i : i + 1]), cache=cache)[0, -1]) for i in range(ids.shape[1])]
    assert calls and all(call[1].dtype == np.uint16 for call in calls)  # the bf16 bits, widened in the kernel
    assert rel_err(np.stack(steps), hf_bf16.logits(ids)[0]) < 1e-5
