"""The server's prefix store: whole cache states by prompt prefix, restored exactly, bounded in bytes."""

from __future__ import annotations

import gc

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import TEXT

from mlx_qwen35.engine import Request, prefill, run
from mlx_qwen35.media import PromptInputs
from mlx_qwen35.sampling import Sampling
from mlx_qwen35.server.prompt_cache import PrefixStore, key_of, prefix_keys
from mlx_qwen35.tokenizer import render_prompt

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a sea."},
    {"role": "assistant", "content": "The Baltic."},
    {"role": "user", "content": "And a lake?"},
]


def state_bytes(n: int) -> int:
    """Bytes of the whole cache after ``n`` tokens, from the checkpoint's config (float32)."""
    t = TEXT
    linear = t["layer_types"].count("linear_attention")
    attention = t["layer_types"].count("full_attention")
    keys = t["linear_num_key_heads"] * t["linear_key_head_dim"]
    conv_dim = 2 * keys + t["linear_num_value_heads"] * t["linear_value_head_dim"]
    conv = (t["linear_conv_kernel_dim"] - 1) * conv_dim
    recurrent = t["linear_num_value_heads"] * t["linear_value_head_dim"] * t["linear_key_head_dim"]
    kv = 2 * t["num_key_value_heads"] * t["head_dim"] * n
    return 4 * (linear * (conv + recurrent) + attention * kv)


@pytest.fixture(scope="module")
def prompt(chat_model):
    model, tok = chat_model
    ids = render_prompt(tok, CONVERSATION)
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    return ids, [i for i, t in enumerate(ids) if t == im_start and i > 0]


def stored(model, ids, n, store, kv_bits=None) -> None:
    cache = model.make_cache(kv_bits)
    prefill(model, ids[:n], cache)
    mx.eval([c.state for c in cache])
    store.put(key_of(ids[:n]), n, cache)


def lookup(store, ids, bounds):
    return store.lookup(prefix_keys(ids, bounds))


@pytest.mark.parametrize("kv_bits", [None, 8])
def test_a_restored_prefix_continues_as_a_full_prefill(chat_model, prompt, kv_bits):
    model, _ = chat_model
    ids, bounds = prompt
    store = PrefixStore(1 << 30)
    n = bounds[1]  # before the assistant's message
    stored(model, ids, n, store, kv_bits)
    entry = lookup(store, ids, bounds)
    assert entry.n == n
    cache = model.make_cache(kv_bits)
    store.restore(entry, cache)
    full = prefill(model, ids, model.make_cache(kv_bits))
    np.testing.assert_allclose(np.array(prefill(model, ids[n:], cache)), np.array(full), rtol=1e-5, atol=1e-5)


def test_an_entry_holds_exactly_n_tokens_of_state(chat_model, prompt):
    model, _ = chat_model
    ids, bounds = prompt
    store = PrefixStore(1 << 30)
    for n in bounds[:2]:
        stored(model, ids, n, store)
    entries = list(store.entries.values())
    assert [e.nbytes for e in entries] == [state_bytes(n) for n in bounds[:2]]
    assert store.nbytes == sum(state_bytes(n) for n in bounds[:2])
    kv = [state for state, meta in entries[1].layers if meta is not None][0]
    assert kv["k0"].shape == (1, TEXT["num_key_value_heads"], bounds[1], TEXT["head_dim"])


def test_lookup_finds_the_longest_stored_prefix_among_the_boundaries(chat_model, prompt):
    model, _ = chat_model
    ids, bounds = prompt
    store = PrefixStore(1 << 30)
    assert lookup(store, ids, bounds) is None
    stored(model, ids, bounds[0], store)
    stored(model, ids, bounds[2], store)
    assert lookup(store, ids, bounds).n == bounds[2]
    assert lookup(store, ids, bounds[:2]).n == bounds[0]  # the boundaries bound what may be restored
    other = list(ids)
    other[1] += 1  # another conversation with the same length
    assert lookup(store, other, bounds) is None


def test_least_recently_used_entries_go_past_the_budget(chat_model, prompt):
    model, _ = chat_model
    ids, bounds = prompt
    a, b, c = bounds[:3]
    store = PrefixStore(state_bytes(a) + state_bytes(b) + state_bytes(c) - 1)
    for n in (a, b):
        stored(model, ids, n, store)
    assert lookup(store, ids, [a]).n == a  # a is now the most recently used
    stored(model, ids, c, store)
    assert [e.n for e in store.entries.values()] == [a, c]
    assert store.nbytes == state_bytes(a) + state_bytes(c)
    small = PrefixStore(state_bytes(a) - 1)
    stored(model, ids, a, small)
    assert not small.entries and small.nbytes == 0  # larger than the whole budget: not kept


def test_a_restored_request_does_not_change_the_stored_state(chat_model, prompt):
    model, tok = chat_model
    ids, bounds = prompt
    store = PrefixStore(1 << 30)
    n = bounds[1]
    stored(model, ids, n, store)
    entry = lookup(store, ids, bounds)
    before = [{k: np.array(a) for k, a in state.items()} for state, _ in entry.layers]
    cache = model.make_cache()
    store.restore(entry, cache)
    # What a cache may do to the arrays it holds: write them in place (a[...] = x rebinds the object).
    for c in cache:
        if c.meta_state is None:
            c.cache[1][...] = 7.0
        else:
            c.keys[..., :1, :] = 7.0
    gen = run(model, tok, Request(PromptInputs(ids), False, Sampling(temperature=0.0), 4, start=n), cache)
    list(gen)
    after = [{k: np.array(a) for k, a in state.items()} for state, _ in entry.layers]
    for b, a in zip(before, after):
        assert b.keys() == a.keys()
        for k in b:
            np.testing.assert_array_equal(a[k], b[k])


def test_an_entry_keeps_only_its_own_bytes_alive(chat_model, prompt):
    """Copies, not views: a view of the live cache's KV buffer would keep the whole buffer (and more) alive."""
    model, _ = chat_model
    ids, bounds = prompt
    n = bounds[0]
    store = PrefixStore(1 << 30)
    cache = model.make_cache()
    prefill(model, ids[:n], cache)
    mx.eval([c.state for c in cache])
    mx.clear_cache()  # buffers reused from MLX's cache (those the prefill freed) may be larger than asked for
    store.put(key_of(ids[:n]), n, cache)
    del cache
    gc.collect(), mx.synchronize()
    kept = mx.get_active_memory()
    store.entries.clear()
    gc.collect(), mx.synchronize()
    assert kept - mx.get_active_memory() == state_bytes(n)
