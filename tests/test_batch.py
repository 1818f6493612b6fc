"""Batched generation: each sequence of a batch generates what it would alone.

The reference for every sequence is :func:`generate` on its own (one
sequence, its own cache), on the tiny float32 model with the real tokenizer.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mlx_qwen35.batch import Batch
from mlx_qwen35.errors import Qwen35Error
from mlx_qwen35.generate import batch_generate, generate, stream_batch_generate
from mlx_qwen35.model import batch_cache
from mlx_qwen35.sampling import Sampling
from mlx_qwen35.turn import Settings, prepare

GREEDY = Sampling(temperature=0.0)
PROMPTS = [
    "Hi",
    "Tell me a long story about the sea, the wind, the ships and the sailors who crossed it long ago.",
    "Name a prime number.",
]


def alone(model, tok, item: dict, **shared):
    spec = {**shared, **item}
    return generate(model, tok, spec.pop("prompt"), **spec)


def assert_same(batched, single):
    assert batched.tokens == single.tokens
    assert (batched.text, batched.reasoning) == (single.text, single.reasoning)
    assert batched.finish_reason == single.finish_reason


def test_prompts_of_different_lengths_ending_at_different_steps(chat_model):
    model, tok = chat_model
    items = [{"prompt": p, "max_tokens": n} for p, n in zip(PROMPTS, (9, 4, 14))]
    results = batch_generate(model, tok, items, sampling=GREEDY)
    for item, result in zip(items, results):
        assert_same(result, alone(model, tok, item, sampling=GREEDY))
    assert [r.generation_tokens for r in results] == [9, 4, 14]


def test_a_sequence_joins_mid_flight_and_finished_rows_are_freed(chat_model):
    model, tok = chat_model
    s = Settings(sampling=GREEDY, max_tokens=10)
    requests = [prepare(model, tok, s, p).request for p in PROMPTS]
    batch = Batch(model, tok)
    results = {}
    batch.add(0, requests[0])
    batch.add(1, requests[1])
    steps = 0
    while batch.active:
        for e in batch.step():
            if e.result is not None:
                results[e.key] = e.result
        steps += 1
        if steps == 4:
            assert len(batch.rows) == 2
            before = batch_cache.nbytes(batch.cache)
            batch.add(2, requests[2])
        if steps == 5:
            assert len(batch.rows) == 3
            assert batch_cache.nbytes(batch.cache) > before
    for i, p in enumerate(PROMPTS):
        assert_same(results[i], generate(model, tok, p, sampling=GREEDY, max_tokens=10))
    assert batch.cache is None and batch.rows == []  # every row left, its memory with it


def test_a_finished_row_leaves_and_the_others_go_on(chat_model):
    model, tok = chat_model
    batch = Batch(model, tok)
    for i, (p, n) in enumerate(zip(PROMPTS, (3, 12, 12))):
        batch.add(i, prepare(model, tok, Settings(sampling=GREEDY, max_tokens=n), p).request)
    sizes = []
    while batch.active:
        batch.step()
        if batch.cache is not None:
            sizes.append((len(batch.rows), batch.cache[0].cache[1].shape[0], batch.cache[3].keys.shape[0]))
    assert (3, 3, 3) in sizes and (2, 2, 2) in sizes  # the short one left; its state and KV rows went with it


def test_thinking_on_for_one_off_for_another(chat_model):
    model, tok = chat_model
    items = [
        {"prompt": "Think about cats.", "think": True, "thinking_budget": 5, "max_tokens": 30},
        {"prompt": "Say hello.", "think": False, "max_tokens": 8},
        {"prompt": "Think about dogs.", "think": True, "max_tokens": 6},
    ]
    results = batch_generate(model, tok, items, sampling=GREEDY)
    for item, result in zip(items, results):
        assert_same(result, alone(model, tok, item, sampling=GREEDY))
    assert results[0].reasoning and results[0].text  # the budget closed the thinking, then the answer
    assert results[1].reasoning == ""


def test_per_sequence_sampling_and_stop_strings(chat_model):
    model, tok = chat_model
    penalized = Sampling(temperature=0.0, presence_penalty=1.5, repetition_penalty=1.3)
    first = generate(model, tok, PROMPTS[2], sampling=GREEDY, max_tokens=12).text
    stop = first[len(first) // 2 : len(first) // 2 + 2]
    items = [
        {"prompt": PROMPTS[0], "sampling": penalized, "max_tokens": 12},
        {"prompt": PROMPTS[2], "stop": [stop], "max_tokens": 12},
        {"prompt": PROMPTS[1], "max_tokens": 12},
    ]
    results = batch_generate(model, tok, items, sampling=GREEDY)
    for item, result in zip(items, results):
        assert_same(result, alone(model, tok, item, sampling=GREEDY))
    assert stop not in results[1].text and len(results[1].text) < len(first)


def test_stream_tags_each_piece_with_its_sequence(chat_model):
    model, tok = chat_model
    items = [{"prompt": PROMPTS[0], "think": True, "max_tokens": 8}, {"prompt": PROMPTS[2], "max_tokens": 5}]
    ended = []
    gen = stream_batch_generate(model, tok, items, sampling=GREEDY, on_result=lambda i, r: ended.append(i))
    texts = {0: {"reasoning": "", "answer": ""}, 1: {"reasoning": "", "answer": ""}}
    for i, piece in gen:
        texts[i][piece.kind] += piece.text
    for i, result in enumerate(gen.results):
        assert (texts[i]["reasoning"], texts[i]["answer"]) == (result.reasoning, result.text)
    assert sorted(ended) == [0, 1]


def test_a_failing_sequence_fails_alone(chat_model, tmp_path):
    model, tok = chat_model
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    too_long = " ".join(["sea"] * model.config.text.max_position_embeddings)
    items = [PROMPTS[0], {"prompt": "Look", "images": [bad]}, too_long, PROMPTS[2]]
    results = batch_generate(model, tok, items, sampling=GREEDY, max_tokens=6)
    assert results[1].finish_reason == "error" and "notes.txt" in results[1].error
    assert results[2].finish_reason == "error" and "longer than the model's context" in results[2].error
    for i in (0, 3):
        assert results[i].error is None
        assert_same(results[i], generate(model, tok, items[i], sampling=GREEDY, max_tokens=6))


def test_an_image_prompt_in_a_batch(chat_model, tmp_path):
    model, tok = chat_model
    path = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(path)
    items = [{"prompt": "What is this?", "images": [path]}, PROMPTS[1], {"prompt": "And this?", "images": [path]}]
    results = batch_generate(model, tok, items, sampling=GREEDY, max_tokens=8)
    for item, result in zip(items, results):
        spec = item if isinstance(item, dict) else {"prompt": item}
        assert_same(result, alone(model, tok, spec, sampling=GREEDY, max_tokens=8))


def test_bad_arguments_are_one_line(chat_model):
    model, tok = chat_model
    with pytest.raises(Qwen35Error, match="prompts\\[1\\]: unknown key 'temp'"):
        batch_generate(model, tok, ["Hi", {"prompt": "Hi", "temp": 0}])
    with pytest.raises(Qwen35Error, match="unknown setting 'kv_bits'"):
        batch_generate(model, tok, ["Hi"], kv_bits=4)
    with pytest.raises(Qwen35Error, match="max_rows"):
        Batch(model, tok, max_rows=0)


def test_a_row_brings_its_cache_takes_snapshots_and_keeps_its_cache(chat_model):
    from dataclasses import replace

    from mlx_qwen35.engine import prefill, run
    from mlx_qwen35.model import cache as hybrid

    model, tok = chat_model
    s = Settings(sampling=GREEDY, max_tokens=7)
    request = prepare(model, tok, s, PROMPTS[1]).request
    n = len(request.prompt.ids)
    alone_cache = model.make_cache()
    gen = run(model, tok, request, alone_cache)
    for _ in gen:
        pass
    # The first 10 prompt tokens come in a cache; a snapshot is asked for at 20.
    cache = model.make_cache()
    prefill(model, request.prompt.ids[:10], cache)
    batch = Batch(model, tok)
    snaps = []
    batch.add("next", prepare(model, tok, s, PROMPTS[0]).request)
    batch.add("cached", replace(request, start=10), cache, snapshot_at=[20], keep_cache=True,
              on_snapshot=lambda k: snaps.append((k, hybrid.offset(cache))))
    ended = {}
    while batch.active:
        ended.update({e.key: e for e in batch.step() if e.result is not None})
    assert snaps == [(20, 20)]
    assert_same(ended["cached"].result, gen.result)
    assert ended["cached"].result.prefilled_tokens == n - 10
    kept = ended["cached"].cache
    assert hybrid.offset(kept) == hybrid.offset(alone_cache) == n + 7 - 1  # the last token is never fed
    for ours, theirs in zip(kept, alone_cache):
        for name, a in theirs.state.items():
            np.testing.assert_allclose(np.array(ours.state[name]), np.array(a), rtol=1e-4, atol=1e-5)


def test_a_seed_reproduces_generate_for_a_request_alone(chat_model):
    model, tok = chat_model
    s = Settings(sampling=Sampling(temperature=1.0, top_k=20, top_p=0.9), max_tokens=8, seed=7)
    batch = Batch(model, tok)
    batch.add(0, prepare(model, tok, s, PROMPTS[2]).request)
    while batch.active:
        result = next((e.result for e in batch.step() if e.result is not None), None)
    single = generate(model, tok, PROMPTS[2], sampling=s.sampling, max_tokens=8, seed=7)
    assert result.tokens == single.tokens


def test_prompts_of_very_different_lengths_are_not_padded_together(chat_model, monkeypatch):
    model, tok = chat_model
    sizes = []
    together = Batch._prefill_together
    monkeypatch.setattr(Batch, "_prefill_together", lambda self, rows: (
        sizes.append(sorted(len(r.request.prompt.ids) for r in rows)), together(self, rows))[1])
    long = " ".join(["waves"] * 60)
    items = [PROMPTS[0], long, PROMPTS[2], long + " and wind"]
    results = batch_generate(model, tok, items, sampling=GREEDY, max_tokens=4)
    assert len(sizes) == 2 and sizes[0][0] > 60 and sizes[1][-1] < 20  # the long ones together, then the short ones
    for item, result in zip(items, results):
        assert_same(result, generate(model, tok, item, sampling=GREEDY, max_tokens=4))
