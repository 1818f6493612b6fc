"""What a Chat keeps between turns, as the README states it: the quantized KV cache, the cache
snapshots, each image's features, lazily loaded vision weights, and the session's model fingerprint.

The tiny model has the real vocabulary and chat template (conftest ``chat_model``).
"""

from __future__ import annotations

import gc

import mlx.core as mx
import numpy as np
import pytest
from conftest import rel_err
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.cache import QuantizedKVCache
from PIL import Image
from typer.testing import CliRunner

from mlx_qwen35 import chat as chat_module
from mlx_qwen35.chat import Chat
from mlx_qwen35.cli import app
from mlx_qwen35.engine import prefill
from mlx_qwen35.errors import Qwen35Error
from mlx_qwen35.generate import stream_generate
from mlx_qwen35.loading import load_model
from mlx_qwen35.model import Model
from mlx_qwen35.model import cache as hybrid
from mlx_qwen35.model.vision import VisionModel
from mlx_qwen35.sampling import Sampling
from mlx_qwen35.session import model_identity
from mlx_qwen35.tokenizer import render_prompt

GREEDY = Sampling(temperature=0.0)
TURNS = ["Hello!", "What is a prime number?", "Give me two.", "And the next one?"]
# README "Sessions and long context": the next-token logits with a quantized KV cache, relative to the float cache.
KV_ERROR = {8: 5e-3, 4: 6e-2}


def cold_logits(model, ids) -> np.ndarray:
    return np.array(prefill(model, ids, model.make_cache()))


def assert_quantized(cache, bits: int) -> None:
    """Every attention layer holds packed keys and values (uint32 + scales + biases) at ``bits``."""
    attention = [c for c in cache if not isinstance(c, hybrid.ArraysCache)]
    assert attention and all(isinstance(c, QuantizedKVCache) and c.bits == bits and c.offset > 0 for c in attention)
    for c in attention:
        for packed in (c.keys, c.values):
            assert packed[0].dtype == mx.uint32 and packed[1].dtype == packed[2].dtype == mx.float32


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_kv_is_used_and_within_the_stated_error(chat_model, bits):
    model, tok = chat_model
    chat = Chat(model, tok, sampling=GREEDY, max_tokens=6, kv_bits=bits)
    for i, message in enumerate(TURNS):
        gen = chat.send(message)
        list(gen)
        assert_quantized(chat.cache, bits)
        # against a float cache on the same prompt (the quantized chat's own history)
        err = rel_err(np.array(gen.prompt_logits), cold_logits(model, render_prompt(tok, chat.messages[:-1])))
        assert 0 < err < KV_ERROR[bits]
        if i:
            assert gen.result.prefilled_tokens < gen.result.prompt_tokens  # the quantized cache was reused

    made = []
    real = Model.make_cache
    prompt = "Why is the sky blue? " * 8
    exact = stream_generate(model, tok, prompt, sampling=GREEDY, max_tokens=2)
    list(exact)
    try:
        Model.make_cache = lambda self, kv_bits=None, **kw: made.append(real(self, kv_bits, **kw)) or made[-1]
        gen = stream_generate(model, tok, prompt, sampling=GREEDY, max_tokens=2, kv_bits=bits)
        list(gen)
    finally:
        Model.make_cache = real
    assert len(made) == 1
    assert_quantized(made[0], bits)
    assert 0 < rel_err(np.array(gen.prompt_logits), np.array(exact.prompt_logits)) < KV_ERROR[bits]


@pytest.mark.parametrize("command, extra", [("generate", ["-p", "Hi"]), ("chat", [])])
def test_kv_bits_option_reaches_the_cache(chat_model_dir, monkeypatch, command, extra):
    made = []
    real = Model.make_cache
    monkeypatch.setattr(Model, "make_cache", lambda self, kv_bits=None, **kw: made.append(real(self, kv_bits, **kw)) or made[-1])
    r = CliRunner().invoke(
        app, [command, "--model", str(chat_model_dir), "--temp", "0", "--max-tokens", "2", "--kv-bits", "4", *extra],
        input="Hello\n",
    )
    assert r.exit_code == 0, r.output
    used = [c for c in made if any(not isinstance(x, hybrid.ArraysCache) and x.offset for x in c)]
    assert len(used) == 1
    assert_quantized(used[0], 4)


# ---- snapshots --------------------------------------------------------------------------


def snapshot_offsets(tok, ids, every: int) -> list[int]:
    """Where Chat must snapshot a fresh prompt: each message start and every ``every`` tokens."""
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    return sorted({i for i, t in enumerate(ids) if t == im_start and i > 0} | set(range(every, len(ids), every)))


def test_snapshots_every_n_tokens_restore_exactly(chat_model, monkeypatch):
    model, tok = chat_model
    monkeypatch.setattr(chat_module, "SNAPSHOT_EVERY", 16)
    chat = Chat(model, tok, sampling=GREEDY, max_tokens=3, system="Be brief.")
    chat.ask("Tell me everything you know about prime numbers, twin primes and the primes below one hundred.")
    ids = chat.tokens
    offsets = snapshot_offsets(tok, ids, 16)
    assert len(offsets) >= 4
    assert [n for n, _ in chat.snapshots] == [0] + offsets
    # each snapshot is the cache at its offset: restoring it and prefilling the rest gives the cold logits
    cold = cold_logits(model, ids)
    for n, snap in reversed(chat.snapshots):
        hybrid.restore(chat.cache, snap, n)
        assert rel_err(np.array(prefill(model, ids[n:], chat.cache)), cold) < 1e-5, n


def test_snapshot_eviction_keeps_the_empty_cache(chat_model, monkeypatch):
    model, tok = chat_model
    monkeypatch.setattr(chat_module, "SNAPSHOT_EVERY", 4)
    monkeypatch.setattr(chat_module, "MAX_SNAPSHOTS", 4)
    chat = Chat(model, tok, sampling=GREEDY, max_tokens=3)
    chat.ask("Tell me everything you know about prime numbers, twin primes and the primes below one hundred.")
    offsets = snapshot_offsets(tok, chat.tokens, 4)
    assert len(offsets) > 4
    assert [n for n, _ in chat.snapshots] == [0] + offsets[-3:]
    # a prompt that shares nothing but the first token must fall back to the empty cache and stay exact
    chat.system = "Something else entirely."
    gen = chat.send("Hi")
    list(gen)
    assert gen.result.prefilled_tokens == gen.result.prompt_tokens
    messages = [{"role": "system", "content": chat.system}] + chat.messages[:-1]
    assert rel_err(np.array(gen.prompt_logits), cold_logits(model, render_prompt(tok, messages))) < 1e-5


# ---- images ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pictures")
    paths = []
    for i in range(2):
        rng = np.random.default_rng(i)
        paths.append(folder / f"p{i}.png")
        Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def test_each_image_is_encoded_once(chat_model, image_files, tmp_path, monkeypatch):
    model, tok = chat_model
    calls = []
    real = VisionModel.__call__
    monkeypatch.setattr(VisionModel, "__call__", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    chat = Chat(model, tok, sampling=GREEDY, max_tokens=3)
    chat.ask("What is this?", images=image_files[:1])
    assert len(calls) == 1
    chat.ask("And the colours?")
    chat.ask("Compare it with this one.", images=image_files[1:])
    chat.ask("Which is brighter?")
    assert len(calls) == 2
    chat.save(tmp_path / "s.session")
    resumed = Chat.load(tmp_path / "s.session", model, tok)
    resumed.ask("Thanks.")
    assert len(calls) == 2  # saved sessions keep the features


def resident_bytes_of(params) -> int:
    """Bytes that evaluating ``params`` newly allocates: 0 when they are already loaded."""
    gc.collect()
    mx.synchronize()  # decoding leaves a step in flight
    before = mx.get_active_memory()
    mx.eval(params)
    return mx.get_active_memory() - before


def test_vision_weights_load_only_when_an_image_arrives(chat_model, chat_model_dir, image_files, tmp_path):
    tok = chat_model[1]
    model = load_model(chat_model_dir)  # fresh: the session fixture's tower may have run already
    vision_bytes = sum(w.nbytes for _, w in tree_flatten(model.visual.parameters()))
    chat = Chat(model, tok, sampling=GREEDY, max_tokens=3)
    chat.ask("Hello!")
    chat.ask("What is a prime number?")
    chat.save(tmp_path / "s.session")
    Chat.load(tmp_path / "s.session", model, tok).ask("Thanks.")
    # a text-only session never read the tower: evaluating it now allocates all of it
    assert resident_bytes_of(model.visual.parameters()) >= vision_bytes

    model = load_model(chat_model_dir)
    chat = Chat(model, tok, sampling=GREEDY, max_tokens=3)
    chat.ask("Hello!")
    chat.ask("What is this?", images=image_files[:1])
    assert resident_bytes_of(model.visual.parameters()) == 0  # the first image loaded it


# ---- the session's model fingerprint -----------------------------------------------------


def test_fingerprint_covers_every_text_weight(chat_model_dir, chat_model, tmp_path):
    model, tok = chat_model
    chat = Chat(model, tok, sampling=GREEDY, max_tokens=3)
    chat.ask("Hi")
    path = chat.save(tmp_path / "s.session")
    twin = load_model(chat_model_dir)
    assert model_identity(twin) == model_identity(model)
    Chat.load(path, twin, tok)
    # the same shape and config, one tensor changed: any tensor, a middle layer's as well as the head's
    weights = dict(tree_flatten(twin.language_model.parameters()))
    assert len(weights) > 40
    for name, w in weights.items():
        twin.language_model.update(tree_unflatten(list({**weights, name: w * 1.01 + 1e-3}.items())))
        assert model_identity(twin) != model_identity(model), name
    twin.language_model.update(tree_unflatten(list(weights.items())))
    assert model_identity(twin) == model_identity(model)
    middle = "layers.1.mlp.down_proj.weight"
    twin.language_model.update(tree_unflatten(list({**weights, middle: weights[middle] + 1e-3}.items())))
    with pytest.raises(Qwen35Error, match="saved with a different model"):
        Chat.load(path, twin, tok)

