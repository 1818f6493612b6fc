"""The recurrence engine against the plain sequential reference.

Errors are relative Frobenius norms, ‖x − ref‖_F / ‖ref‖_F, taken separately
for y and for the final state. float32: 1e-5. bfloat16 q/k/v: the reference
runs on the same bf16 values in float32, so the state (float32 throughout)
stays within 1e-5 and y within 1e-2, its rounding to bf16 on output.

The Metal kernel is proven here by compiling kernels/gated_delta.metal as C++
under tests/metal_shim (32 lanes per SIMD-group run as cooperative threads);
on a Mac the same cases also run the real kernel through MLX.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlx_qwen35.gated_delta as gd
from mlx_qwen35.backend import blas_hint
from mlx_qwen35.errors import Qwen35Error

ROOT = Path(__file__).resolve().parent.parent
SHIM = ROOT / "tests" / "metal_shim"
TS = (1, 2, 63, 64, 65, 300, 1000)
F32_TOL = 1e-5
BF16_Y_TOL = 1e-2


@pytest.fixture(autouse=True)
def no_forced_method(monkeypatch):
    """These tests choose methods themselves (and test the variable)."""
    monkeypatch.delenv(gd.ENV_METHOD, raising=False)


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
        y, s = gd.gated_delta_update(nan(q), nan(k), nan(v), nan(g), nan(beta), s0, mask, method=method)
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
    y, s = gd.gated_delta_update(*inputs, method="chunked")
    assert y.dtype == mx.bfloat16 and s.dtype == mx.float32
    assert rel_err(y, y_ref) < BF16_Y_TOL
    assert rel_err(s, s_ref) < F32_TOL


def test_dtypes_and_defaults():
    q, k, v, g, beta, _, _ = make_inputs(1, 3, 2, 4, 16, 24, state=False, mask=False)
    for method in ("reference", "chunked", "fast", "auto"):
        y, s = gd.gated_delta_update(q, k, v.astype(mx.float16), g, beta, method=method)
        assert y.dtype == mx.float16 and s.dtype == mx.float32 and s.shape == (1, 4, 24, 16)
    y, s = gd.gated_delta_update(q[:, :0], k[:, :0], v[:, :0], g[:, :0], beta[:, :0])
    assert y.shape == (1, 0, 4, 24) and mx.all(s == 0).item()


def test_env_var_forces_method(monkeypatch, grid):
    inputs, (y_ref, s_ref) = grid["T63-Hv4-state-mask"]
    monkeypatch.setenv(gd.ENV_METHOD, "reference")
    y, s = gd.gated_delta_update(*inputs)
    assert mx.array_equal(y, y_ref) and mx.array_equal(s, s_ref)
    monkeypatch.setenv(gd.ENV_METHOD, "fast")
    y_fast, s_fast = mx.fast.gated_delta_update(*inputs)
    y, s = gd.gated_delta_update(*inputs)
    assert mx.array_equal(y, y_fast) and mx.array_equal(s, s_fast)
    monkeypatch.setenv(gd.ENV_METHOD, "quick")
    with pytest.raises(Qwen35Error, match=gd.ENV_METHOD):
        gd.gated_delta_update(*inputs)


def test_bad_input_is_named():
    q, k, v, g, beta, s0, m = make_inputs(2, 4, 2, 4, 16, 24, state=True, mask=True)
    with pytest.raises(Qwen35Error, match="v must be"):
        gd.gated_delta_update(q, k, v[:, :, :3], g, beta)
    with pytest.raises(Qwen35Error, match="beta must be"):
        gd.gated_delta_update(q, k, v, g, beta[:, :, :2])
    with pytest.raises(Qwen35Error, match="state must be"):
        gd.gated_delta_update(q, k, v, g, beta, s0.swapaxes(-1, -2))
    with pytest.raises(Qwen35Error, match="mask must be"):
        gd.gated_delta_update(q, k, v, g, beta, s0, m[:, :2])
    with pytest.raises(Qwen35Error, match="method='fastest'"):
        gd.gated_delta_update(q, k, v, g, beta, method="fastest")


@pytest.mark.skipif(mx.metal.is_available(), reason="Metal is available here")
def test_metal_method_needs_metal():
    inputs = make_inputs(1, 2, 2, 2, 32, 32, state=False, mask=False)
    with pytest.raises(Qwen35Error, match="Apple GPU"):
        gd.gated_delta_update(*inputs, method="metal")


# --------------------------------------------------------------------------- self-check


@pytest.fixture
def fake_metal(monkeypatch):
    """Pretend Metal is there; the test decides what the kernel returns."""
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(gd, "_metal_checked", set())
    monkeypatch.setattr(gd, "_metal_healthy", True)
    calls = []

    def install(kernel):
        def run(*args, **kwargs):
            calls.append(args)
            return kernel(*args, **kwargs)

        monkeypatch.setattr(gd, "_run_metal", run)
        return calls

    return install


def broken_compile(*args, **kwargs):
    raise RuntimeError("[metal::Device] Unable to build metal library from source")


def wrong_numbers(q, k, v, g, beta, state, mask, lanes):
    y, s = gd.reference(q, k, v, g, beta, state, mask)
    return y + 1.0, s


@pytest.mark.parametrize("kernel", [broken_compile, wrong_numbers])
def test_broken_kernel_falls_back_to_chunked_with_one_warning(fake_metal, caplog, grid, kernel):
    calls = fake_metal(kernel)
    inputs, (y_ref, s_ref) = grid["T65-Hv4-state-mask"]
    with caplog.at_level(logging.WARNING, logger=gd.__name__):
        for _ in range(3):
            y, s = gd.gated_delta_update(*inputs, method="metal")
            assert rel_err(y, y_ref) < F32_TOL and rel_err(s, s_ref) < F32_TOL
    assert len(calls) == 1  # the self-check, never again
    assert len(caplog.records) == 1 and "self-check" in caplog.records[0].getMessage()


def test_healthy_kernel_is_checked_once_per_instantiation(fake_metal, caplog, grid):
    calls = fake_metal(lambda *a: gd.reference(*a[:7]))
    inputs, _ = grid["T2-Hv4-state-mask"]
    with caplog.at_level(logging.WARNING, logger=gd.__name__):
        for _ in range(3):
            gd.gated_delta_update(*inputs, method="metal")
        gd.gated_delta_update(*inputs[:6], None, method="metal")  # unmasked: another kernel
    assert len(calls) == 2 + 3 + 1
    assert not caplog.records


def test_auto_on_metal_runs_the_kernel_for_decode_and_mx_fast_for_prefill(fake_metal, monkeypatch, grid):
    monkeypatch.setattr(gd, "_on_metal", lambda: True)
    calls = fake_metal(lambda *a: gd.reference(*a[:7]))
    short, _ = grid["T2-Hv4-state-mask"]
    gd.gated_delta_update(*short)
    assert len(calls) == 2  # self-check, then the run
    long, _ = grid["T65-Hv4-state-mask"]
    y, s = gd.gated_delta_update(*long)
    y_fast, s_fast = mx.fast.gated_delta_update(*long)
    assert mx.array_equal(y, y_fast) and mx.array_equal(s, s_fast) and len(calls) == 2


@pytest.mark.skipif(mx.metal.is_available(), reason="the CPU table")
def test_auto_on_cpu_runs_chunked(grid):
    for case in ("T1-Hv2", "T300-Hv4-state-mask"):
        inputs, _ = grid[case]
        y, s = gd.gated_delta_update(*inputs)
        y_c, s_c = gd.chunked(*inputs)
        assert mx.array_equal(y, y_c) and mx.array_equal(s, s_c)


# --------------------------------------------------------------------------- Metal kernel

# Shapes for the kernel: Dk != Dv, Hv = Hk with 32 lanes a row (simd_sum)
# and Hv = 2·Hk with 4 lanes a row (simd_shuffle_xor butterfly).
SHIM_CONFIGS = {
    "simd_sum": dict(Dk=32, Dv=4, Hk=2, Hv=2, lanes=32),
    "butterfly": dict(Dk=32, Dv=16, Hk=2, Hv=4, lanes=4),
}
# What the body may name of what MLX puts in a generated signature; the shim
# harness declares exactly these, so both compile the same parameter list.
SIGNATURE_ATTRIBUTES = {"thread_index_in_simdgroup", "thread_position_in_grid"}


# The thread attributes mx.fast.metal_kernel adds when the source names them.
METAL_ATTRIBUTES = {
    "dispatch_quadgroups_per_threadgroup",
    "dispatch_simdgroups_per_threadgroup",
    "dispatch_threads_per_threadgroup",
    "grid_origin",
    "grid_size",
    "quadgroup_index_in_threadgroup",
    "quadgroups_per_threadgroup",
    "simdgroup_index_in_threadgroup",
    "simdgroups_per_threadgroup",
    "thread_execution_width",
    "thread_index_in_quadgroup",
    "thread_index_in_simdgroup",
    "thread_index_in_threadgroup",
    "thread_position_in_grid",
    "thread_position_in_threadgroup",
    "threadgroup_position_in_grid",
    "threadgroups_per_grid",
    "threads_per_grid",
    "threads_per_simdgroup",
    "threads_per_threadgroup",
}


def test_kernel_source_names_only_what_the_shim_declares():
    source = gd.KERNEL_SOURCE.read_text()
    harness = (SHIM / "harness.cpp").read_text()
    for attr in SIGNATURE_ATTRIBUTES:
        assert attr in source and attr in harness
    for attr in METAL_ATTRIBUTES - SIGNATURE_ATTRIBUTES:
        assert attr not in source, f"{attr} would enter MLX's signature but not the shim's"
    for name in ("q", "k", "v", "g", "beta", "state_in", "mask", "T"):
        for suffix in ("_shape", "_strides", "_ndim"):
            assert name + suffix not in source


def _compiler():
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")


@pytest.fixture(scope="module")
def shim(tmp_path_factory):
    """The kernel compiled as C++ under the shim, one library per config."""
    cxx = _compiler()
    if cxx is None:
        pytest.fail("no C++ compiler (g++ or clang++) to build tests/metal_shim")
    out = tmp_path_factory.mktemp("metal_shim")

    def build(name):
        c = SHIM_CONFIGS[name]
        lib = out / f"{name}.so"
        cmd = [cxx, "-std=c++17", "-O1", "-Wall", "-Werror", "-shared", "-fPIC"]
        cmd += [f"-I{SHIM}", f"-I{gd.KERNEL_SOURCE.parent}"]
        cmd += [f"-DGDN_{key.upper()}={c[key]}" for key in ("Dk", "Dv", "Hk", "Hv", "lanes")]
        cmd += [str(SHIM / "harness.cpp"), "-o", str(lib)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        return name, ctypes.CDLL(str(lib))

    with ThreadPoolExecutor(len(SHIM_CONFIGS)) as pool:
        return dict(pool.map(build, SHIM_CONFIGS))


def run_shim(lib, q, k, v, g, beta, state, mask):
    """The kernel on the CPU: same inputs, outputs and conventions as gd._run_metal."""
    B, T, _, Dk = q.shape
    Hv, Dv = v.shape[-2:]
    low = v.dtype == mx.bfloat16
    io = (lambda x: np.array(x.astype(mx.bfloat16).view(mx.uint16))) if low else (lambda x: np.array(x, np.float32))
    f32 = lambda x: np.ascontiguousarray(np.array(x, dtype=np.float32))
    qn, kn, vn = (np.ascontiguousarray(io(x)) for x in (q, k, v))
    gn, bn = f32(g), f32(beta)
    sn = f32(state) if state is not None else np.zeros((B, Hv, Dv, Dk), np.float32)
    mn = np.ascontiguousarray(np.array(mask)) if mask is not None else np.ones(1, np.bool_)
    # MLX hands kernels uninitialised outputs: start from NaN so unwritten elements show.
    y = np.full((B, T, Hv, Dv), 0x7FC0, np.uint16) if low else np.full((B, T, Hv, Dv), np.nan, np.float32)
    s_out = np.full_like(sn, np.nan)
    err = ctypes.create_string_buffer(256)
    ptr = lambda a: a.ctypes.data_as(ctypes.c_void_p)
    rc = lib.gdn_run(
        B, T, int(mask is not None), int(low), ptr(qn), ptr(kn), ptr(vn), ptr(gn), ptr(bn),
        ptr(sn), ptr(mn), ptr(y), ptr(s_out), err, len(err),
    )  # fmt: skip
    assert rc == 0, err.value.decode()
    y = mx.array(y).view(mx.bfloat16) if low else mx.array(y)
    return y, mx.array(s_out)


# Every T; with B = 1 plain and with B = 2 initial state + left padding.
SHIM_CASES = [(T, variant) for T in TS for variant in ("plain", "state-mask")]


@pytest.fixture(scope="module")
def shim_grid():
    out = {}
    for name, c in SHIM_CONFIGS.items():
        for T, variant in SHIM_CASES:
            both = variant == "state-mask"
            inputs = make_inputs(2 if both else 1, T, c["Hk"], c["Hv"], c["Dk"], c["Dv"], state=both, mask=both, seed=T)
            ref = gd.reference(*inputs)
            mx.eval(ref)
            out[name, T, variant] = inputs, ref
    return out


@pytest.mark.parametrize("config", SHIM_CONFIGS)
@pytest.mark.parametrize("T,variant", SHIM_CASES)
def test_metal_kernel_on_cpu_shim(shim, shim_grid, config, T, variant):
    inputs, (y_ref, s_ref) = shim_grid[config, T, variant]
    assert gd._metal_lanes(T, SHIM_CONFIGS[config]["Dk"], SHIM_CONFIGS[config]["Dv"]) is not None
    y, s = run_shim(shim[config], *inputs)
    assert rel_err(y, y_ref) < F32_TOL
    assert rel_err(s, s_ref) < F32_TOL


@pytest.mark.parametrize("config", SHIM_CONFIGS)
def test_metal_kernel_on_cpu_shim_bf16(shim, config):
    c = SHIM_CONFIGS[config]
    inputs = bf16(make_inputs(2, 65, c["Hk"], c["Hv"], c["Dk"], c["Dv"], state=True, mask=True, seed=7))
    y_ref, s_ref = gd.reference(*inputs)
    y, s = run_shim(shim[config], *inputs)
    assert y.dtype == mx.bfloat16
    assert rel_err(y, y_ref) < BF16_Y_TOL
    assert rel_err(s, s_ref) < F32_TOL


def test_shim_rejects_non_uniform_simd_functions(tmp_path):
    """The shim is strict where Metal is undefined: half the lanes reaching simd_sum fails."""
    src = tmp_path / "diverge.cpp"
    src.write_text(
        '#include <cstdio>\n#include "metal_shim.h"\n'
        'extern "C" int diverge(char* err, int n) {\n'
        "  try { shim::dispatch(uint3{32, 1, 1}, [](uint3 pos, uint lane) {\n"
        "      if (lane < 16) simd_sum(float(pos.x)); });\n"
        "  } catch (const std::exception& e) { std::snprintf(err, size_t(n), \"%s\", e.what()); return 1; }\n"
        "  return 0;\n}\n"
    )
    lib = tmp_path / "diverge.so"
    proc = subprocess.run([_compiler(), "-std=c++17", "-shared", "-fPIC", f"-I{SHIM}", str(src), "-o", str(lib)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    err = ctypes.create_string_buffer(256)
    assert ctypes.CDLL(str(lib)).diverge(err, len(err)) == 1
    assert "16 of 32 lanes" in err.value.decode()


@pytest.mark.skipif(not mx.metal.is_available(), reason="needs an Apple GPU")
@pytest.mark.parametrize("config", SHIM_CONFIGS)
@pytest.mark.parametrize("T,variant", SHIM_CASES)
def test_metal_kernel_on_gpu(shim_grid, config, T, variant):
    inputs, (y_ref, s_ref) = shim_grid[config, T, variant]
    c = SHIM_CONFIGS[config]
    y, s = gd._run_metal(*inputs, lanes=gd._metal_lanes(T, c["Dk"], c["Dv"]))
    assert rel_err(y, y_ref) < F32_TOL
    assert rel_err(s, s_ref) < F32_TOL


# --------------------------------------------------------------------------- BLAS hint

OPENBLAS = Path(f"/usr/lib/{os.uname().machine}-linux-gnu/openblas-pthread/libblas.so.3")


def hint_in_subprocess(**env) -> str:
    code = "import numpy, mlx.core; from mlx_qwen35.backend import blas_hint; print(blas_hint())"
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
