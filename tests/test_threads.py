"""Any thread may call the API, one after another or at once.

MLX streams belong to the thread that made them: a stream cached for the
whole process (the recurrence's second stream, used past 128 tokens) fails in
every other thread with ``There is no Stream(cpu, N) in current thread``. MLX
also caches compiled graphs per thread (see the per-shape kernels below).
"""

from __future__ import annotations

import threading

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import mlx_qwen35.ops.recurrence as gd
from mlx_qwen35.generate import generate
from mlx_qwen35.ops import cpu
from mlx_qwen35.ops.dispatch import ENV_METHOD
from mlx_qwen35.sampling import Sampling


def in_threads(fn, n: int = 1) -> list:
    """fn() in n threads started together; their results, or the first exception raised."""
    results, errors = [None] * n, []

    def run(i):
        try:
            results[i] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


@pytest.fixture(autouse=True)
def auto_method(monkeypatch):
    monkeypatch.delenv(ENV_METHOD, raising=False)


def test_long_recurrence_in_any_thread():
    rng = np.random.default_rng(0)
    f = lambda *shape: mx.array(rng.standard_normal(shape).astype(np.float32))
    T = 3 * gd.SEGMENT  # segments prepared on the second stream
    q, k, v = f(1, T, 2, 16) * 0.1, f(1, T, 2, 16) * 0.2, f(1, T, 2, 16)
    g, beta = mx.full((1, T, 2), 0.9), mx.full((1, T, 2), 0.5)

    def run():
        y, s = gd.chunked(q, k, v, g, beta)
        mx.eval(y, s)
        return np.array(y), np.array(s)

    first = run()  # this thread made its stream first
    for y, s in in_threads(run) + in_threads(run) + in_threads(run, 2):
        assert np.array_equal(y, first[0]) and np.array_equal(s, first[1])


def test_compiled_kernels_in_threads_at_once(monkeypatch):
    """Per-shape kernels evicted all the time, in four threads at once: every result is MLX's own op's.

    MLX caches a compiled graph per thread and frees it only in the thread
    that drops the function: a kernel evicted by one thread stayed cached in
    another, where the next kernel at the same address ran its graph.
    """
    monkeypatch.setattr(cpu, "_SHAPES_KEPT", 1)
    seeds = iter(range(4))

    def run():
        rng = np.random.default_rng(next(seeds))
        wrong = []
        for _ in range(300):
            shape = (1, int(rng.integers(1, 6)), 16)
            x, u = (mx.array(rng.standard_normal(shape).astype(np.float32)) for _ in range(2))
            if not mx.allclose(cpu.swiglu(x, u), nn.silu(x) * u, rtol=1e-5, atol=1e-6).item():
                wrong.append(x.shape)
            if not mx.allclose(cpu.sigmoid_mul(x, u), u * mx.sigmoid(x), rtol=1e-5, atol=1e-6).item():
                wrong.append(x.shape)
        return wrong

    assert in_threads(run, 4) == [[]] * 4


def test_generate_from_another_thread(chat_model):
    """A prompt of more than 128 tokens, generated here and then from other threads, alone and together."""
    model, tok = chat_model
    prompt = " ".join(f"word{i}" for i in range(150))
    assert len(tok.encode(prompt)) > gd.SEGMENT
    run = lambda: generate(model, tok, prompt, max_tokens=4, sampling=Sampling(temperature=0.0)).text
    here = run()
    assert in_threads(run) == [here]
    assert in_threads(run, 2) == [here, here]
