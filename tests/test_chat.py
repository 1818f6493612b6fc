"""Multi-turn cache reuse and saved sessions, on the tiny model with the real template."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from conftest import rel_err

from mlx_qwen35 import session
from mlx_qwen35.chat import Chat
from mlx_qwen35.engine import prefill
from mlx_qwen35.errors import Qwen35Error
from mlx_qwen35.sampling import Sampling
from mlx_qwen35.tokenizer import render_prompt

GREEDY = Sampling(temperature=0.0)
TURNS = ["Hello!", "What is a prime number?", "Give me two.", "And the next one?", "Thanks.", "Bye now."]


def cold_logits(model, ids) -> np.ndarray:
    return np.array(prefill(model, ids, model.make_cache()))


def test_six_turns_with_thinking_reuse_the_cache_exactly(chat_model):
    model, tok = chat_model
    chat = Chat(model, tok, think=True, thinking_budget=6, sampling=GREEDY, max_tokens=14, system="Be brief.")
    previous: list[int] = []
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    for i, message in enumerate(TURNS):
        gen = chat.send(message)
        list(gen)
        messages = [{"role": "system", "content": "Be brief."}] + chat.messages[:-1]
        ids = render_prompt(tok, messages, enable_thinking=True)
        # The same next-token logits as a cold prefill of the full rendered prompt…
        assert rel_err(np.array(gen.prompt_logits), cold_logits(model, ids)) < 1e-5
        # …having run only the tokens after the latest message boundary inside the shared prefix.
        common = next((j for j, (a, b) in enumerate(zip(ids, previous)) if a != b), min(len(ids), len(previous)))
        restored = max([0] + [j for j in range(common + 1) if j < len(ids) and ids[j] == im_start])
        assert gen.result.prefilled_tokens == len(ids) - restored
        if i:
            assert restored > 0
        previous = ids
    # the template dropped past reasoning, so each turn diverged inside the previous prompt
    assert all(m.get("reasoning_content") for m in chat.messages if m["role"] == "assistant")


def test_interrupted_turn_keeps_the_conversation(chat_model):
    model, tok = chat_model
    chat = Chat(model, tok, sampling=GREEDY, max_tokens=20)
    gen = chat.send("Count to ten.")
    next(gen)
    gen.close()
    assert chat.history[-1].finish_reason == "interrupted"
    assert [m["role"] for m in chat.messages] == ["user", "assistant"]
    gen = chat.send("Again.")
    list(gen)
    ids = render_prompt(tok, chat.messages[:-1])
    assert rel_err(np.array(gen.prompt_logits), cold_logits(model, ids)) < 1e-5


def continuation(chat: Chat, message: str) -> list[int]:
    return chat.ask(message).tokens


@pytest.mark.parametrize("kv_bits", [None, 8])
def test_save_load_continues_exactly(chat_model, tmp_path, kv_bits):
    model, tok = chat_model
    a = Chat(model, tok, think=True, thinking_budget=4, sampling=GREEDY, max_tokens=10, kv_bits=kv_bits)
    b = Chat(model, tok, think=True, thinking_budget=4, sampling=GREEDY, max_tokens=10, kv_bits=kv_bits)
    for m in TURNS[:2]:
        assert continuation(a, m) == continuation(b, m)
    b.save(tmp_path / "s.session")
    resumed = Chat.load(tmp_path / "s.session", model, tok)
    assert resumed.messages == a.messages and resumed.think and resumed.kv_bits == kv_bits
    for m in TURNS[2:4]:
        g1, g2 = resumed.send(m), a.send(m)
        assert list(g1) == list(g2) and g1.result.tokens == g2.result.tokens
        # the very same numbers as the chat that never saved, not only the same greedy tokens
        assert np.array_equal(np.array(g1.prompt_logits), np.array(g2.prompt_logits))
        assert g1.result.prefilled_tokens == g2.result.prefilled_tokens < g1.result.prompt_tokens


def saved(chat_model, tmp_path):
    model, tok = chat_model
    chat = Chat(model, tok, sampling=GREEDY, max_tokens=5)
    chat.ask("Hi")
    return chat.save(tmp_path / "s.session")


def test_session_from_another_model(chat_model, hf_text, tmp_path):
    from mlx_qwen35.loading import load_model

    path = saved(chat_model, tmp_path)
    other = load_model(hf_text.path)
    with pytest.raises(Qwen35Error, match="saved with a different model"):
        Chat.load(path, other, chat_model[1])


def test_a_version_2_session_still_loads(chat_model, tmp_path):
    """Sessions saved before tools (format 2: no tools, no reply tokens) resume and go on exactly."""
    from mlx_qwen35 import session

    model, tok = chat_model
    a = Chat(model, tok, sampling=GREEDY, max_tokens=5)
    b = Chat(model, tok, sampling=GREEDY, max_tokens=5)
    assert continuation(a, TURNS[0]) == continuation(b, TURNS[0])
    path = b.save(tmp_path / "s.session")
    arrays, meta = mx.load(str(path), format="safetensors", return_metadata=True)
    m = json.loads(meta["session"])
    del m["digest"], m["reply_tokens"], m["settings"]["tools"]
    m["version"] = 2
    m["digest"] = session._digest({k: v for k, v in m.items() if k != "digest"}, arrays)
    mx.save_safetensors(str(tmp_path / "v2.safetensors"), arrays, metadata={"session": json.dumps(m)})
    resumed = Chat.load(tmp_path / "v2.safetensors", model, tok)
    assert resumed.messages == a.messages and resumed.tools is None
    g1, g2 = resumed.send(TURNS[1]), a.send(TURNS[1])
    assert list(g1) == list(g2) and g1.result.prefilled_tokens == g2.result.prefilled_tokens


def test_tampered_truncated_and_foreign_sessions(chat_model, tmp_path):
    path = saved(chat_model, tmp_path)
    model, tok = chat_model
    data = path.read_bytes()

    (tmp_path / "t.session").write_bytes(data[:-100])
    with pytest.raises(Qwen35Error, match="truncated"):
        Chat.load(tmp_path / "t.session", model, tok)

    flipped = bytearray(data)
    flipped[-3] ^= 0xFF
    (tmp_path / "f.session").write_bytes(bytes(flipped))
    with pytest.raises(Qwen35Error, match="damaged or modified"):
        Chat.load(tmp_path / "f.session", model, tok)

    arrays, meta = mx.load(str(path), format="safetensors", return_metadata=True)
    m = json.loads(meta["session"])
    m["messages"][0]["content"] = "Something else"
    mx.save_safetensors(str(tmp_path / "m.safetensors"), arrays, metadata={"session": json.dumps(m)})
    with pytest.raises(Qwen35Error, match="damaged or modified"):
        Chat.load(tmp_path / "m.safetensors", model, tok)

    m["version"] = 99
    mx.save_safetensors(str(tmp_path / "v.safetensors"), arrays, metadata={"session": json.dumps(m)})
    with pytest.raises(Qwen35Error, match="session format version 99"):
        Chat.load(tmp_path / "v.safetensors", model, tok)

    mx.save_safetensors(str(tmp_path / "w.safetensors"), {"x": mx.zeros(3)})
    with pytest.raises(Qwen35Error, match="not an mlx_qwen35 session file"):
        Chat.load(tmp_path / "w.safetensors", model, tok)


def test_failed_save_keeps_the_old_file(chat_model, tmp_path, monkeypatch):
    path = saved(chat_model, tmp_path)
    before = path.read_bytes()
    model, tok = chat_model
    chat = Chat(model, tok, sampling=GREEDY, max_tokens=3)
    chat.ask("Something new")

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mx, "save_safetensors", boom)
    with pytest.raises(OSError):
        chat.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    with pytest.raises(Qwen35Error, match="cannot save here"):
        chat.save(tmp_path / "missing-dir" / "s.session")
    shutil.rmtree(tmp_path)


def test_cache_that_does_not_match_its_metadata(chat_model, tmp_path):
    path = saved(chat_model, tmp_path)
    model, tok = chat_model
    arrays, metadata = mx.load(str(path), format="safetensors", return_metadata=True)
    good = json.loads(metadata["session"])
    good.pop("digest")
    attention = next(i for i, n in enumerate(good["kv_offsets"]) if n)
    recurrent = good["kv_offsets"].index(None)
    for layer, offset in ((attention, good["kv_offsets"][attention] + 5), (recurrent, 3)):
        meta = json.loads(json.dumps(good))
        meta["kv_offsets"][layer] = offset
        meta["digest"] = session._digest(meta, arrays)
        mx.save_safetensors(str(tmp_path / "k.safetensors"), arrays, metadata={"session": json.dumps(meta)})
        with pytest.raises(Qwen35Error, match=f"layer {layer}'s cache does not match 'kv_offsets'"):
            Chat.load(tmp_path / "k.safetensors", model, tok)
