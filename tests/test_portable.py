"""``MLX_QWEN35_PORTABLE=1``: the plain MLX op graph an Apple GPU runs, here on the CPU.

With the variable set, each CPU-specific path is off: its function is never
called, or the result is MLX's own operation bit for bit. The recurrence runs
through ``mx.fast.gated_delta_update``, and the model still matches
transformers (CI runs the parity, vision, chat and media tests once more in
this mode).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import rel_err, spy

import mlx_qwen35.ops.recurrence as gd
from mlx_qwen35 import ops
from mlx_qwen35.errors import Qwen35Error
from mlx_qwen35.loading import load_model
from mlx_qwen35.ops import cpu, linear
from mlx_qwen35.ops.dispatch import ENV_METHOD, ENV_PORTABLE, portable


@pytest.fixture
def portable_on(monkeypatch):
    monkeypatch.setenv(ENV_PORTABLE, "1")
    monkeypatch.delenv(ENV_METHOD, raising=False)


def test_the_switch(monkeypatch):
    monkeypatch.delenv(ENV_PORTABLE, raising=False)
    assert not portable()
    for value, on in (("1", True), ("0", False), ("", False)):
        monkeypatch.setenv(ENV_PORTABLE, value)
        assert portable() is on
    monkeypatch.setenv(ENV_PORTABLE, "yes")
    with pytest.raises(Qwen35Error, match=f"{ENV_PORTABLE}='yes': expected 1"):
        portable()


def test_projections_are_the_layers_own(portable_on):
    """No float32 BLAS detour: bf16 and quantized layers multiply natively, as on Metal."""
    mx.random.seed(0)
    lin = nn.Linear(256, 300, bias=True)
    lin.set_dtype(mx.bfloat16)
    x = mx.random.normal((1, linear.HALF_BLAS_ROWS + 3, 256)).astype(mx.bfloat16)
    assert mx.array_equal(ops.prepare(lin)(x), lin(x)).item()
    q = nn.QuantizedLinear.from_linear(lin, group_size=64, bits=4)
    assert mx.array_equal(ops.prepare(q)(x), q(x)).item()
    head = nn.QuantizedEmbedding.from_embedding(nn.Embedding(300, 256), group_size=64, bits=4)
    assert mx.array_equal(ops.prepare(head).as_linear(x[0]), head.as_linear(x[0])).item()
    lin.set_dtype(mx.float32)  # and no numpy gemv for a float32 row
    x = mx.random.normal((1, 1, 256))
    assert mx.array_equal(ops.prepare(lin)(x), lin(x)).item()


def test_activations_are_mlx_ops(portable_on):
    rng = np.random.default_rng(0)
    x, u = (mx.array((rng.standard_normal((3, 50, 64)) * 4).astype(np.float32)) for _ in range(2))
    assert mx.array_equal(ops.swiglu(x, u), nn.silu(x) * u).item()
    assert mx.array_equal(ops.sigmoid_mul(x, u), u * mx.sigmoid(x)).item()


# What the CPU runs instead of MLX's own graph: blocked attention, the conv as
# shifted taps, the polynomial activations, the chunked two-stream recurrence.
CPU_PATHS = [(cpu, "cpu_attention"), (cpu, "conv_taps"), (cpu, "_swiglu"), (cpu, "_gated"), (gd, "chunked")]


@pytest.mark.parametrize("mode", ["cpu", "portable"])
def test_model_forward_takes_no_cpu_path(monkeypatch, hf_gqa, token_ids, mode):
    monkeypatch.setenv(ENV_PORTABLE, "1" if mode == "portable" else "0")
    monkeypatch.delenv(ENV_METHOD, raising=False)
    calls = {name: spy(monkeypatch, owner, name) for owner, name in CPU_PATHS}
    fast = spy(monkeypatch, mx.fast, "gated_delta_update")
    model = load_model(hf_gqa.path)
    with mx.stream(mx.cpu):  # on a Mac too
        logits = np.array(model(mx.array(token_ids)))
    assert rel_err(logits, hf_gqa.logits(token_ids)) < 1e-5
    if mode == "portable":
        assert not any(calls.values()), [name for name, c in calls.items() if c]
        assert len(fast) == 3  # one per Gated DeltaNet layer
    else:  # the spies see the CPU paths when they run
        assert all(calls.values()) and not fast
