"""Any thread may call the API, one after another or at once.

MLX streams belong to the thread that made them: a stream cached for the
whole process (the recurrence's second stream, used past 128 tokens) fails in
every other thread with ``There is no Stream(cpu, N) in current thread``.
"""

from __future__ import annotations

import threading

import mlx.core as mx
import numpy as np
import pytest

import mlx_qwen35.gated_delta as gd
from mlx_qwen35.generate import Sampling, generate


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
    monkeypatch.delenv(gd.ENV_METHOD, raising=False)


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


def test_generate_from_another_thread(chat_model):
    """A prompt of more than 128 tokens, generated here and then from other threads, alone and together."""
    model, tok = chat_model
    prompt = " ".join(f"word{i}" for i in range(150))
    assert len(tok.encode(prompt)) > gd.SEGMENT
    run = lambda: generate(model, tok, prompt, max_tokens=4, sampling=Sampling(temperature=0.0)).text
    here = run()
    assert in_threads(run) == [here]
    assert in_threads(run, 2) == [here, here]
