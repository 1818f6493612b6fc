"""The recurrence engine against the plain sequential reference.

Errors are relative Frobenius norms, ‖x − ref‖_F / ‖ref‖_F, taken separately
for y and for the final state. float32: 1e-5. bfloat16 q/k/v: the reference
runs on the same bf16 values in float32, so the state (float32 throughout)
stays within 1e-5 and y within 1e-2, its rounding to bf16 on output.

The Metal kernel is proven here by compiling ops/gated_delta.metal as C++
under tests/metal_shim (32 lanes per SIMD-group run as cooperative threads),
launched by the same Python code that launches it on Metal; on a Mac the same
cases also run the real kernel through MLX. ``reference`` itself is checked
against transformers' and mlx-lm's recurrences.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import spy
from metal_shim import shim

import mlx_qwen35.ops.recurrence as gd
from mlx_qwen35.ops import dispatch, metal
from mlx_qwen35.ops.blas import blas_hint
from mlx_qwen35.ops.dispatch import ENV_PORTABLE
from mlx_qwen35.errors import Qwen35Error

ROOT = Path(__file__).resolve().parent.parent
TS = (1, 2, 63, 64, 65, 300, 1000)
F32_TOL = 1e-5
BF16_Y_TOL = 1e-2


@pytest.fixture(autouse=True)
def no_forced_method(monkeypatch):
    """These tests choose methods themselves (and test the variable)."""
    monkeypatch.delenv(dispatch.ENV_METHOD, raising=False)


def rel_err(x: mx.array, ref: mx.array) -> float:
    x, ref = x.astype(mx.float32), ref.astype(mx.float32)
    return (mx.linalg.norm((x - ref).flatten()) / mx.linalg.norm(ref.flatten())).item()


def make_inputs(B, T, Hk, Hv, Dk, Dv, *, state: bool, mask: bool, seed: int = 0):
    """Model-like inputs: unit keys, scaled unit queries, decays in (0, 1)."""
    rng = np.random.default_rng(seed)

    def unit(shape):
        x = rng.standard_normal(shape)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    f = lambda x: mx.array(np.asarray(x, dtype=np.float32))
    q = f(unit((B, T, Hk, Dk)) * Dk**-0.5)
    k = f(unit((B, T, Hk, Dk)))
    v = f(rng.standard_normal((B, T, Hv, Dv)))
    g = f(np.exp(-np.exp(rng.uniform(-3, 1, (B, T, Hv)))))
    beta = f(1 / (1 + np.exp(-rng.standard_normal((B, T, Hv)))))
    s0 = f(rng.standard_normal((B, Hv, Dv, Dk)) * 0.5) if state else None
    # Left padding: row b starts at offset b * T // 3 (row 0 unpadded).
    m = mx.array(np.arange(T)[None] >= (np.arange(B) * T // 3)[:, None]) if mask else None
    return q, k, v, g, beta, s0, m


# The grid: Hv = Hk and Hv = 2·Hk, Dk != Dv, with and without initial state
# and left-padding mask, at every T in TS.
CASES = [
    dict(T=T, Hk=2, Hv=Hv, state=state, mask=mask)
    for T in TS
    for Hv in (2, 4)
    for state, mask in ((False, False), (True, True), (True, False), (False, True))
]
case_id = lambda c: f"T{c['T']}-Hv{c['Hv']}{'-state' if c['state'] else ''}{'-mask' if c['mask'] else ''}"


@pytest.fixture(scope="module")
def grid():
    """Inputs and reference outputs per case, computed once."""
    out = {}
    for i, c in enumerate(CASES):
        inputs = make_inputs(2, c["T"], c["Hk"], c["Hv"], 16, 24, state=c["state"], mask=c["mask"], seed=i)
        ref = gd.reference(*inputs)
        mx.eval(ref)
        out[case_id(c)] = inputs, ref
    return out


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_chunked_matches_reference(grid, case):
    inputs, (y_ref, s_ref) = grid[case_id(case)]
    y, s = gd.chunked(*inputs)
    assert rel_err(y, y_ref) < F32_TOL
    assert rel_err(s, s_ref) < F32_TOL


@pytest.mark.parametrize("chunk", [1, 3, 16, 64, 128])
def test_chunked_any_chunk_size(grid, chunk):
    inputs, (y_ref, s_ref) = grid["T300-Hv4-state-mask"]
    y, s = gd.chunked(*inputs, chunk=chunk)
    assert rel_err(y, y_ref) < F32_TOL
    assert rel_err(s, s_ref) < F32_TOL


def test_masked_steps_are_identity_and_zero():
    q, k, v, g, beta, s0, _ = make_inputs(1, 40, 2, 4, 16, 24, state=True, mask=False)
    mask = mx.array(np.arange(40)[None] >= 9)
    # Garbage on the padded steps must not leak: the mask, not the values, decides.
    nan = lambda x: mx.where(mask.reshape(1, 40, *([1] * (x.ndim - 2))), x, float("nan"))
    for method in ("reference", "chunked", "auto"):  # auto: the Metal kernel on a Mac
        y, s = dispatch.gated_delta_update(nan(q), nan(k), nan(v), nan(g), nan(beta), s0, mask, method=method)
        y_tail, s_tail = gd.reference(q[:, 9:], k[:, 9:], v[:, 9:], g[:, 9:], beta[:, 9:], s0)
        assert mx.all(y[:, :9] == 0).item()
        assert rel_err(y[:, 9:], y_tail) < F32_TOL
        assert rel_err(s, s_tail) < F32_TOL


@pytest.mark.parametrize("T", [5, 64, 200])
def test_chunked_extreme_decays_and_repeated_keys(T):
    """g = 0 exactly (an underflowed exp), 1e-30 and 1 mixed in; keys repeated."""
    q, k, v, g, beta, s0, _ = make_inputs(1, T, 2, 2, 16, 24, state=True, mask=False, seed=T)
    rng = np.random.default_rng(T)
    pick = rng.integers(0, 4, size=g.shape)
    g = mx.where(mx.array(pick == 0), 0.0, mx.where(mx.array(pick == 1), 1e-30, mx.where(mx.array(pick == 2), 1.0, g)))
    k = mx.concatenate([k[:, : T // 2], k[:, : T - T // 2]], axis=1)  # every key seen twice
    beta = mx.where(mx.array(rng.random(beta.shape) < 0.3), 1.0, beta)
    y_ref, s_ref = gd.reference(q, k, v, g, beta, s0)
    y, s = gd.chunked(q, k, v, g, beta, s0)
    assert mx.all(mx.isfinite(y)).item() and mx.all(mx.isfinite(s)).item()
    assert rel_err(y, y_ref) < F32_TOL
    assert rel_err(s, s_ref) < F32_TOL


def bf16(inputs):
    q, k, v, g, beta, s0, m = inputs
    return (q.astype(mx.bfloat16), k.astype(mx.bfloat16), v.astype(mx.bfloat16), g, beta, s0, m)


@pytest.mark.parametrize("T", [1, 65, 300])
def test_chunked_bf16(T):
    inputs = bf16(make_inputs(2, T, 2, 4, 16, 24, state=True, mask=True, seed=T))
    y_ref, s_ref = gd.reference(*inputs)
    y, s = dispatch.gated_delta_update(*inputs, method="chunked")
    assert y.dtype == mx.bfloat16 and s.dtype == mx.float32
    assert rel_err(y, y_ref) < BF16_Y_TOL
    assert rel_err(s, s_ref) < F32_TOL


def test_dtypes_and_defaults():
    q, k, v, g, beta, _, _ = make_inputs(1, 3, 2, 4, 16, 24, state=False, mask=False)
    for method in ("reference", "chunked", "fast", "auto"):
        y, s = dispatch.gated_delta_update(q, k, v.astype(mx.float16), g, beta, method=method)
        assert y.dtype == mx.float16 and s.dtype == mx.float32 and s.shape == (1, 4, 24, 16)
    y, s = dispatch.gated_delta_update(q[:, :0], k[:, :0], v[:, :0], g[:, :0], beta[:, :0])
    assert y.shape == (1, 0, 4, 24) and mx.all(s == 0).item()


def test_env_var_forces_method(monkeypatch, grid):
    inputs, (y_ref, s_ref) = grid["T63-Hv4-state-mask"]
    monkeypatch.setenv(dispatch.ENV_METHOD, "reference")
    y, s = dispatch.gated_delta_update(*inputs)
    assert mx.array_equal(y, y_ref) and mx.array_equal(s, s_ref)
    monkeypatch.setenv(dispatch.ENV_METHOD, "fast")
    y_fast, s_fast = mx.fast.gated_delta_update(*inputs)
    y, s = dispatch.gated_delta_update(*inputs)
    assert mx.array_equal(y, y_fast) and mx.array_equal(s, s_fast)
    monkeypatch.setenv(dispatch.ENV_METHOD, "quick")
    with pytest.raises(Qwen35Error, match=dispatch.ENV_METHOD):
        dispatch.gated_delta_update(*inputs)


def test_bad_input_is_named():
    q, k, v, g, beta, s0, m = make_inputs(2, 4, 2, 4, 16, 24, state=True, mask=True)
    with pytest.raises(Qwen35Error, match="v must be"):
        dispatch.gated_delta_update(q, k, v[:, :, :3], g, beta)
    with pytest.raises(Qwen35Error, match="beta must be"):
        dispatch.gated_delta_update(q, k, v, g, beta[:, :, :2])
    with pytest.raises(Qwen35Error, match="state must be"):
        dispatch.gated_delta_update(q, k, v, g, beta, s0.swapaxes(-1, -2))
    with pytest.raises(Qwen35Error, match="mask must be"):
        dispatch.gated_delta_update(q, k, v, g, beta, s0, m[:, :2])
    with pytest.raises(Qwen35Error, match="method='fastest'"):
        dispatch.gated_delta_update(q, k, v, g, beta, method="fastest")


@pytest.mark.skipif(mx.metal.is_available(), reason="Metal is available here")
def test_metal_method_needs_metal():
    inputs = make_inputs(1, 2, 2, 2, 32, 32, state=False, mask=False)
    with pytest.raises(Qwen35Error, match="Apple GPU"):
        dispatch.gated_delta_update(*inputs, method="metal")


# --------------------------------------------------------------------------- mx.fast


def test_fast_keeps_the_decay_in_float32():
    """MLX casts g to q's dtype: bf16 q and k must not round a decay near 1."""
    q, k, v, g, beta, s0, _ = bf16(make_inputs(1, 64, 2, 2, 16, 24, state=True, mask=False, seed=3))
    g = mx.array(np.random.default_rng(3).uniform(0.99, 1.0, g.shape).astype(np.float32))
    assert rel_err(g.astype(mx.bfloat16), g) > 1e-4  # the rounding this is about
    y_ref, s_ref = gd.reference(q, k, v, g, beta, s0)
    y, s = dispatch.gated_delta_update(q, k, v, g, beta, s0, method="fast")
    assert rel_err(s, s_ref) < F32_TOL
    assert rel_err(y, y_ref) < BF16_Y_TOL


def test_without_mx_fast_fast_falls_back(monkeypatch, grid):
    """MLX before 0.32.4 has no mx.fast.gated_delta_update: chunked on a CPU, our kernel on a Mac."""
    monkeypatch.delattr(mx.fast, "gated_delta_update")
    inputs, _ = grid["T65-Hv4-state-mask"]
    with mx.stream(mx.cpu):
        y, s = dispatch.gated_delta_update(*inputs, method="fast")
        y_c, s_c = gd.chunked(*inputs)
        assert mx.array_equal(y, y_c) and mx.array_equal(s, s_c)
        monkeypatch.setenv(ENV_PORTABLE, "1")
        y, s = dispatch.gated_delta_update(*inputs)
        assert mx.array_equal(y, y_c) and mx.array_equal(s, s_c)
    monkeypatch.setattr(dispatch, "on_metal", lambda: True)
    assert dispatch.choose_method(65, 16, 16, 128, 128) == "metal"
    assert dispatch.choose_method(65, 2, 4, 16, 24) == "metal"


def test_pyproject_requires_an_mlx_with_mx_fast_gated_delta_update():
    text = (ROOT / "pyproject.toml").read_text()
    pins = re.findall(r'"mlx(?:\[cpu\])?>=([\d.]+);', text)
    assert len(pins) == 2  # Linux and macOS
    assert all(tuple(map(int, p.split("."))) >= (0, 32, 4) for p in pins)


# MLX 0.32.4's GatedDeltaUpdate::use_fallback (mlx/backend/metal/gated_delta_update.cpp;
# the same pairs as the kernels its metallib instantiates): the fused kernel runs on
# the GPU without a mask at Dk = Dv = 128 for these (Hk, Hv).
MLX_FUSED_HEADS = [(16, 16), (16, 32), (16, 48), (16, 64), (24, 24), (32, 32)]


def test_fast_is_fused_follows_mlx(monkeypatch):
    monkeypatch.setattr(dispatch, "on_metal", lambda: False)
    assert not dispatch.fast_is_fused(16, 16, 128, 128, False)
    monkeypatch.setattr(dispatch, "on_metal", lambda: True)
    for Hk, Hv in MLX_FUSED_HEADS:
        assert dispatch.fast_is_fused(Hk, Hv, 128, 128, False)
        assert not dispatch.fast_is_fused(Hk, Hv, 128, 128, True)  # a mask
        assert not dispatch.fast_is_fused(Hk, Hv, 64, 128, False) and not dispatch.fast_is_fused(Hk, Hv, 128, 256, False)
    for Hk, Hv in [(8, 8), (16, 24), (32, 64), (2, 4), (48, 48)]:
        assert not dispatch.fast_is_fused(Hk, Hv, 128, 128, False)
    monkeypatch.delattr(mx.fast, "gated_delta_update")
    assert not dispatch.fast_is_fused(16, 16, 128, 128, False)


def test_auto_on_metal_runs_fast_only_where_mlx_fuses_it(fake_metal, monkeypatch):
    """Decode: our kernel. Prefill: mx.fast where fused, else our kernel (MLX would loop over steps)."""
    monkeypatch.setattr(dispatch, "on_metal", lambda: True)
    calls = fake_metal(lambda *a: gd.reference(*a[:7]))
    fast_calls = spy(monkeypatch, mx.fast, "gated_delta_update")
    prod = lambda T, mask: make_inputs(1, T, 16, 16, 128, 128, state=True, mask=mask)
    dispatch.gated_delta_update(*prod(2, False))
    assert len(calls) == 2 and not fast_calls  # self-check, then the run
    dispatch.gated_delta_update(*prod(17, False))
    assert len(calls) == 2 and len(fast_calls) == 1
    dispatch.gated_delta_update(*prod(17, True))  # masked: not fused
    assert len(calls) == 4 and len(fast_calls) == 1
    dispatch.gated_delta_update(*make_inputs(1, 65, 2, 4, 16, 24, state=True, mask=False))  # heads MLX has no kernel for
    assert len(calls) == 6 and len(fast_calls) == 1


# --------------------------------------------------------------------------- self-check


@pytest.fixture
def fake_metal(monkeypatch):
    """Pretend Metal is there; the test decides what the kernel returns."""
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(metal, "_checked", set())
    monkeypatch.setattr(metal, "_healthy", True)
    calls = []

    def install(kernel):
        def run(*args, **kwargs):
            calls.append(args)
            return kernel(*args, **kwargs)

        monkeypatch.setattr(metal, "run", run)
        return calls

    return install


def broken_compile(*args, **kwargs):
    raise RuntimeError("[metal::Device] Unable to build metal library from source")


def wrong_numbers(q, k, v, g, beta, state, mask, lanes):
    y, s = gd.reference(q, k, v, g, beta, state, mask)
    return y + 1.0, s


def one_state_entry_off(q, k, v, g, beta, state, mask, lanes):
    """Right but for one state entry, off by 5% of the largest."""
    y, s = gd.reference(q, k, v, g, beta, state, mask)
    return y.astype(v.dtype), s + 0.05 * mx.abs(s).max() * (mx.arange(s.size) == 0).reshape(s.shape)


@pytest.mark.parametrize("kernel", [broken_compile, wrong_numbers, one_state_entry_off])
@pytest.mark.parametrize("fused", [True, False], ids=["mlx-fuses", "mlx-would-loop"])
def test_broken_kernel_falls_back_to_a_gpu_path_with_one_warning(fake_metal, monkeypatch, caplog, kernel, fused):
    """Never chunked (its triangular inverse runs on a CPU stream): mx.fast where fused, else reference."""
    monkeypatch.setattr(dispatch, "on_metal", lambda: True)
    calls = fake_metal(kernel)
    chunked_calls = spy(monkeypatch, gd, "chunked")
    fast_calls = spy(monkeypatch, mx.fast, "gated_delta_update")
    Hk, Dk = (16, 128) if fused else (2, 16)
    inputs = bf16(make_inputs(1, 5, Hk, Hk, Dk, Dk, state=True, mask=False, seed=11))
    y_ref, s_ref = gd.reference(*inputs)
    with caplog.at_level(logging.WARNING, logger=metal.__name__):
        for _ in range(3):
            y, s = dispatch.gated_delta_update(*inputs, method="metal")
            assert rel_err(y, y_ref) < BF16_Y_TOL and rel_err(s, s_ref) < F32_TOL
    assert len(calls) == 1  # the self-check, never again
    assert len(caplog.records) == 1 and "self-check" in caplog.records[0].getMessage()
    assert not chunked_calls and len(fast_calls) == (3 if fused else 0)


def test_healthy_kernel_is_checked_once_per_instantiation(fake_metal, caplog, grid):
    calls = fake_metal(lambda *a: gd.reference(*a[:7]))
    inputs, _ = grid["T2-Hv4-state-mask"]
    with caplog.at_level(logging.WARNING, logger=metal.__name__):
        for _ in range(3):
            dispatch.gated_delta_update(*inputs, method="metal")
        dispatch.gated_delta_update(*inputs[:6], None, method="metal")  # unmasked: another kernel
    assert len(calls) == 2 + 3 + 1
    assert not caplog.records


def test_self_check_bounds_state_and_y_apart():
    """The float32 state within 1e-4 of its largest entry, y within its dtype's rounding."""
    q, k, v, g, beta, s0, m = make_inputs(2, 5, 2, 4, 16, 24, state=True, mask=True)
    y, s = gd.reference(q, k, v, g, beta, s0, m)
    problem = lambda y_, s_: metal._problem(y_, s_, y, s)
    assert problem(y, s) is None
    assert problem(y.astype(mx.bfloat16), s) is None  # y's rounding to bf16 is no fault
    assert problem(y * (1 + 1e-3), s).startswith("y ")  # in float32 it is
    assert problem(y.astype(mx.bfloat16) * 1.05, s).startswith("y ")
    one = (mx.arange(s.size) == 7).reshape(s.shape)
    assert problem(y.astype(mx.bfloat16), s + 1e-3 * mx.abs(s).max() * one).startswith("state ")
    assert problem(y, s + 1e-6 * mx.abs(s).max() * one) is None
    assert problem(y, mx.where(one, float("nan"), s)).startswith("state ")
    assert problem(mx.where(mx.arange(y.size).reshape(y.shape) == 0, float("nan"), y), s).startswith("y ")


@pytest.mark.skipif(mx.metal.is_available(), reason="the CPU table")
def test_auto_on_cpu_runs_chunked(grid):
    for case in ("T1-Hv2", "T300-Hv4-state-mask"):
        inputs, _ = grid[case]
        y, s = dispatch.gated_delta_update(*inputs)
        y_c, s_c = gd.chunked(*inputs)
        assert mx.array_equal(y, y_c) and mx.array_equal(s, s_c)


# --------------------------------------------------------------------------- Metal kernel
#
# metal.run runs as it is: on a Mac through MLX, here (and on a Mac too)
# through tests/metal_shim, which stands in for mx.fast.metal_kernel and builds
# and launches whatever the launch code asks for, the kernel compiled as C++
# with 32 lanes per SIMD-group run as cooperative threads.

# (Dk, Dv, Hk, Hv, Ts): every LANES the dispatcher chooses (which depends on T
# and the head sizes), and the 2B's shape (16 heads of 128 x 128) for decode
# and prefill.
KERNEL_SHAPES = {
    "simd_sum": (32, 4, 2, 2, (1, 2, 16)),
    "lanes16": (16, 24, 2, 4, (1, 5)),
    "lanes8": (8, 4, 2, 2, (3,)),
    "butterfly": (32, 16, 2, 4, (17, 64, 300)),
    "lanes2": (6, 16, 1, 2, (20,)),
    "lanes1": (3, 32, 2, 2, (1, 40)),
    "2B-decode": (128, 128, 16, 16, (1,)),
    "2B-prefill": (128, 128, 16, 16, (17,)),
}
# Both mask variants and bf16 where the launch is the 2B's or the two
# reductions'; one variant elsewhere (each variant is a compile).
BOTH = [("plain", "float32"), ("state-mask", "float32"), ("state-mask", "bfloat16")]
VARIANTS = {
    "simd_sum": BOTH,
    "butterfly": BOTH,
    "2B-decode": [("plain", "float32"), ("plain", "bfloat16"), ("state-mask", "float32")],
    "2B-prefill": [("plain", "float32"), ("plain", "bfloat16"), ("state-mask", "float32")],
    "lanes16": [("state-mask", "float32")],
    "lanes8": [("plain", "float32")],
    "lanes2": [("state-mask", "float32")],
    "lanes1": [("plain", "float32")],
}
KERNEL_CASES = [
    (name, T, variant, dtype)
    for name, (*_, Ts) in KERNEL_SHAPES.items()
    for T in Ts
    for variant, dtype in VARIANTS[name]
]
kernel_id = lambda c: f"{c[0]}-T{c[1]}-{c[2]}-{c[3]}"


def kernel_inputs(name, T, variant, dtype):
    Dk, Dv, Hk, Hv, _ = KERNEL_SHAPES[name]
    both = variant == "state-mask"
    inputs = make_inputs(2 if both else 1, T, Hk, Hv, Dk, Dv, state=both, mask=both, seed=T)
    return bf16(inputs) if dtype == "bfloat16" else inputs


def test_kernel_shapes_cover_every_lanes_value():
    chosen = {metal.choose_lanes(T, Dk, Dv) for Dk, Dv, _, _, Ts in KERNEL_SHAPES.values() for T in Ts}
    assert chosen == set(metal.LANES)
    assert metal.choose_lanes(1, 128, 128) == 32 and metal.choose_lanes(17, 128, 128) == 4


@pytest.fixture(scope="module")
def shim_build_dir(tmp_path_factory):
    """The shim's libraries for every case's launch, compiled in parallel up front."""
    if shim.compiler() is None:
        pytest.fail("no C++ compiler (g++ or clang++) to build tests/metal_shim")
    out = tmp_path_factory.mktemp("metal_shim")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(shim.MetalKernel, "build_dir", out)
        mp.setattr(mx.fast, "metal_kernel", shim.MetalKernel)
        metal._kernel.cache_clear()
        kernel = metal._kernel()
        metal._kernel.cache_clear()
        launches = []
        for case in KERNEL_CASES:
            Dk, Dv, *_ = KERNEL_SHAPES[case[0]]
            launches.append(metal._launch(*kernel_inputs(*case), lanes=metal.choose_lanes(case[1], Dk, Dv)))
        with ThreadPoolExecutor(os.cpu_count()) as pool:
            list(pool.map(lambda launch: kernel.build(**launch), launches))
    return out


@pytest.fixture(params=["shim", "metal"])
def kernel_backend(request, monkeypatch, shim_build_dir):
    """Where metal.run's launches go: the C++ shim, or Metal itself (on a Mac)."""
    if request.param == "metal" and not mx.metal.is_available():
        pytest.skip("needs an Apple GPU (Metal)")
    if request.param == "shim":
        monkeypatch.setattr(shim.MetalKernel, "build_dir", shim_build_dir)
        monkeypatch.setattr(mx.fast, "metal_kernel", shim.MetalKernel)
    metal._kernel.cache_clear()
    yield request.param
    metal._kernel.cache_clear()


@pytest.mark.parametrize("case", KERNEL_CASES, ids=kernel_id)
def test_metal_kernel(kernel_backend, case):
    name, T, _, dtype = case
    Dk, Dv, *_ = KERNEL_SHAPES[name]
    inputs = kernel_inputs(*case)
    y_ref, s_ref = gd.reference(*inputs)
    y, s = metal.run(*inputs, lanes=metal.choose_lanes(T, Dk, Dv))
    assert y.dtype == inputs[2].dtype and s.dtype == mx.float32
    assert rel_err(y, y_ref) < (F32_TOL if dtype == "float32" else BF16_Y_TOL)
    assert rel_err(s, s_ref) < F32_TOL


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_metal_method_with_its_self_check(kernel_backend, monkeypatch, dtype):
    """The whole `metal` method at the 2B's shape: the self-check passes, then the run."""
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(metal, "_checked", set())
    monkeypatch.setattr(metal, "_healthy", True)
    inputs = kernel_inputs("2B-decode", 1, "plain", dtype)
    y_ref, s_ref = gd.reference(*inputs)
    y, s = dispatch.gated_delta_update(*inputs, method="metal")
    assert metal._healthy and len(metal._checked) == 1
    assert rel_err(y, y_ref) < (F32_TOL if dtype == "float32" else BF16_Y_TOL) and rel_err(s, s_ref) < F32_TOL


def _wrong(launch: dict, what: str) -> dict:
    grid, group = launch["grid"], launch["threadgroup"]
    if what == "grid-short":
        launch["grid"] = (grid[0], grid[1] // 2, grid[2])
    elif what == "grid-long":
        launch["grid"] = (grid[0], grid[1] * 2, grid[2])
    elif what == "threadgroup":
        launch["threadgroup"] = (16, 2 * group[1], group[2])
    elif what == "lanes":
        launch["template"] = [(n, 8 if n == "LANES" else v) for n, v in launch["template"]]
    elif what == "input-order":
        q, k, *rest = launch["inputs"]
        launch["inputs"] = [k, q, *rest]
    return launch


@pytest.mark.parametrize("what", ["grid-short", "grid-long", "threadgroup", "lanes", "input-order"])
def test_shim_runs_the_launch_it_is_given(kernel_backend, monkeypatch, what):
    """A wrong launch in the Python code fails here: the shim takes nothing from elsewhere."""
    if kernel_backend == "metal":
        pytest.skip("a wrong launch on real Metal is undefined behaviour")
    launch = metal._launch
    monkeypatch.setattr(metal, "_launch", lambda *a: _wrong(launch(*a), what))
    inputs = kernel_inputs("butterfly", 17, "state-mask", "float32")
    y_ref, s_ref = gd.reference(*inputs)
    try:
        y, s = metal.run(*inputs, lanes=metal.choose_lanes(17, 32, 16))
    except RuntimeError as e:
        assert "[metal shim]" in str(e)
    else:
        assert not (rel_err(y, y_ref) < F32_TOL and rel_err(s, s_ref) < F32_TOL)


DIVERGE = """#include <cstdio>
#include "metal_shim.h"
extern "C" int diverge(char* err, int n) {
  try {
    shim::dispatch(uint3{32, 1, 1}, uint3{32, 1, 1}, [](uint3 pos, uint lane) {
      if (lane < 16) simd_sum(float(pos.x));
    });
  } catch (const std::exception& e) {
    std::snprintf(err, size_t(n), "%s", e.what());
    return 1;
  }
  return 0;
}
"""


def test_shim_rejects_non_uniform_simd_functions(shim_build_dir, tmp_path):
    """The shim is strict where Metal is undefined: half the lanes reaching simd_sum fails."""
    lib = shim.compile_library(DIVERGE, tmp_path / "diverge.so")
    err = ctypes.create_string_buffer(256)
    assert lib.diverge(err, len(err)) == 1
    assert "16 of 32 lanes" in err.value.decode()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="macOS's own headers deprecate them: every build there is the test")
def test_shim_builds_where_ucontext_is_deprecated(shim_build_dir, tmp_path):
    """macOS marks getcontext/makecontext/swapcontext deprecated, and the shim builds with -Werror."""
    prelude = tmp_path / "deprecated_ucontext.h"
    prelude.write_text(
        "#include <ucontext.h>\n"
        'extern "C" {\n'
        "int getcontext(ucontext_t*) noexcept __attribute__((deprecated));\n"
        "void makecontext(ucontext_t*, void (*)(void), int, ...) noexcept __attribute__((deprecated));\n"
        "int swapcontext(ucontext_t*, const ucontext_t*) noexcept __attribute__((deprecated));\n"
        "}\n"
    )
    shim.compile_library(DIVERGE, tmp_path / "diverge.so", extra=("-include", str(prelude)))


# mx.fast's chunk-parallel kernel sums in another order than the sequential ones.
FAST_TOL = 1e-4


@pytest.mark.skipif(not mx.metal.is_available(), reason="needs an Apple GPU (Metal)")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", ["metal", "fast"])
@pytest.mark.parametrize("T", [1, 16, 17, 300])
def test_2b_shape_on_the_gpu(method, dtype, T):
    """`metal` and `fast` against `reference` at the 2B's 16 heads of 128 x 128, on the GPU."""
    inputs = make_inputs(2, T, 16, 16, 128, 128, state=True, mask=False, seed=T)
    inputs = bf16(inputs) if dtype == "bfloat16" else inputs
    with mx.stream(mx.cpu):
        y_ref, s_ref = gd.reference(*inputs)
        mx.eval(y_ref, s_ref)
    with mx.stream(mx.gpu):
        y, s = dispatch.gated_delta_update(*inputs, method=method)
        mx.eval(y, s)
    tol = F32_TOL if method == "metal" else FAST_TOL
    assert y.dtype == inputs[2].dtype and rel_err(s, s_ref) < tol
    assert rel_err(y, y_ref) < (tol if dtype == "float32" else BF16_Y_TOL)


# --------------------------------------------------------------------------- independent oracles


def test_reference_matches_transformers_recurrence():
    """transformers' torch loop: raw q and k l2-normalised inside, g in log space, state [Dk, Dv]."""
    import torch
    from transformers.models.qwen3_5.modeling_qwen3_5 import torch_recurrent_gated_delta_rule

    rng = np.random.default_rng(5)
    B, T, Hk, Hv, Dk, Dv = 2, 37, 2, 4, 16, 24
    q_raw, k_raw = (rng.standard_normal((B, T, Hk, Dk)).astype(np.float32) for _ in range(2))
    v = rng.standard_normal((B, T, Hv, Dv)).astype(np.float32)
    log_g = -np.exp(rng.uniform(-3, 1, (B, T, Hv))).astype(np.float32)
    beta = (1 / (1 + np.exp(-rng.standard_normal((B, T, Hv))))).astype(np.float32)
    s0 = (rng.standard_normal((B, Hv, Dk, Dv)) * 0.5).astype(np.float32)
    y_hf, s_hf = torch_recurrent_gated_delta_rule(
        *(torch.from_numpy(x) for x in (q_raw, k_raw, v, log_g, beta)),
        initial_state=torch.from_numpy(s0),
        output_final_state=True,
        use_qk_l2norm_in_kernel=True,
    )
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    f = lambda x: mx.array(np.ascontiguousarray(x))
    y, s = gd.reference(f(unit(q_raw) * Dk**-0.5), f(unit(k_raw)), f(v), f(np.exp(log_g)), f(beta), f(s0.swapaxes(-1, -2)))
    assert rel_err(y, mx.array(y_hf.numpy())) < F32_TOL
    assert rel_err(s.swapaxes(-1, -2), mx.array(s_hf.numpy())) < F32_TOL


def test_reference_matches_mlx_lm_with_a_mask():
    """mlx-lm's ops loop on left-padded rows: same state; y compared where the mask is on (we output zeros off it)."""
    from mlx_lm.models.gated_delta import gated_delta_ops

    q, k, v, g, beta, s0, m = make_inputs(3, 30, 2, 4, 16, 24, state=True, mask=True, seed=9)
    y_lm, s_lm = gated_delta_ops(q, k, v, g, beta, s0, m)
    y, s = gd.reference(q, k, v, g, beta, s0, m)
    on = m[..., None, None]
    assert rel_err(mx.where(on, y, 0.0), mx.where(on, y_lm, 0.0)) < F32_TOL
    assert mx.all(mx.where(on, 0.0, y) == 0).item()
    assert rel_err(s, s_lm) < F32_TOL


# --------------------------------------------------------------------------- BLAS hint

OPENBLAS = Path(f"/usr/lib/{os.uname().machine}-linux-gnu/openblas-pthread/libblas.so.3")


def hint_in_subprocess(**env) -> str:
    code = "import numpy, mlx.core; from mlx_qwen35.ops.blas import blas_hint; print(blas_hint())"
    clean = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "OPENBLAS_CORETYPE")}
    proc = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux BLAS selection")
def test_blas_hint_on_the_bundled_reference_blas():
    hint = hint_in_subprocess()
    assert f"LD_PRELOAD={OPENBLAS}" in hint
    assert ("apt-get install libopenblas0-pthread" in hint) == (not OPENBLAS.exists())


@pytest.mark.skipif(not OPENBLAS.exists(), reason="needs Debian's libopenblas0-pthread")
def test_blas_hint_with_openblas():
    assert hint_in_subprocess(LD_PRELOAD=str(OPENBLAS), OPENBLAS_CORETYPE="Haswell") == "None"
    # Prescott is what OpenBLAS falls back to for CPUs it does not know.
    hint = hint_in_subprocess(LD_PRELOAD=str(OPENBLAS), OPENBLAS_CORETYPE="Prescott")
    flags = Path("/proc/cpuinfo").read_text()
    assert ("OPENBLAS_CORETYPE=" in hint) == (" avx2" in flags)


def test_blas_hint_only_on_linux(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert blas_hint() is None
