"""Generation on a checkpoint whose 512-token vocabulary puts the chat tokens at its own ids, with a short context.

The tokenizer is the fast-loading stand-in of tokenizer_fixture (ranks below 479,
then the 33 added tokens at 479..511) with the tests' chat template. Where a test needs the model to emit a given token (a trained
model's ``<|im_end|>`` or ``</think>``), its output head is steered to it.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import TEXT, build_hf_checkpoint, write_tiny_tokenizer
from conftest import rel_err
from tokenizer_fixture import added_tokens, write_tokenizer

from mlx_qwen35.chat import Chat
from mlx_qwen35.engine import prefill
from mlx_qwen35.errors import Qwen35Error
from mlx_qwen35.generate import generate, stream_generate
from mlx_qwen35.loading import load_model
from mlx_qwen35.reasoning import CLOSING
from mlx_qwen35.figures import stats_line
from mlx_qwen35.sampling import Sampling
from mlx_qwen35.tokenizer import load_tokenizer, render_prompt

VOCAB = 512
CONTEXT = 96
GREEDY = Sampling(temperature=0.0)
SENTENCE = CLOSING.split("\n</think>")[0].strip()

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("shifted_vocab")
    build_hf_checkpoint(
        path, text=dict(TEXT, vocab_size=VOCAB, max_position_embeddings=CONTEXT), vision=None, with_mtp=False
    )
    write_tokenizer(path, max_rank=VOCAB - len(added_tokens()))
    return load_model(path), load_tokenizer(path)


def ids_of(tok, *names: str) -> list[int]:
    return [tok.convert_tokens_to_ids(n) for n in names]


@pytest.fixture
def steer(tiny, monkeypatch):
    """``steer({k: id}, avoid=ids)``: the output head's k-th call from now ranks ``id`` first; ``avoid`` never wins."""
    model, _ = tiny
    lm = model.language_model
    real = lm.logits

    def install(script: dict[int, int], avoid=()):
        calls = iter(range(1 << 30))

        def logits(h):
            out, k = real(h), next(calls)
            vocab = mx.arange(out.shape[-1])
            for t in avoid:
                out = mx.where(vocab == t, -1e4, out)
            return mx.where(vocab == script[k], 1e4, out) if k in script else out

        monkeypatch.setattr(lm, "logits", logits)

    return install


def test_ids_are_this_vocabularys(tiny):
    model, tok = tiny
    im_end, endoftext = ids_of(tok, "<|im_end|>", "<|endoftext|>")
    assert (im_end, endoftext) == (481, 479)  # shifted from the real 248046 and 248044
    assert tok.eos_token_ids == {im_end, endoftext}


def test_tokenizer_without_im_end_is_refused(tmp_path):
    write_tiny_tokenizer(tmp_path)  # bytes, then <|endoftext|>, <|im_start|>, <|im_end|>; no <think>
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3_5"}))
    assert load_tokenizer(tmp_path).eos_token_ids == {256, 258}
    doc = json.loads((tmp_path / "tokenizer.json").read_text())
    doc["added_tokens"] = [t for t in doc["added_tokens"] if t["content"] != "<|im_end|>"]
    (tmp_path / "tokenizer.json").write_text(json.dumps(doc))
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(dict(config, eos_token="<|endoftext|>")))
    with pytest.raises(Qwen35Error, match=r"has no <\|im_end\|> token \(the end of a chat turn\)"):
        load_tokenizer(tmp_path)


def test_generation_stops_at_im_end(tiny, steer):
    model, tok = tiny
    (im_end,) = ids_of(tok, "<|im_end|>")
    steer({4: im_end})
    r = generate(model, tok, "Hello", max_tokens=40, sampling=GREEDY)
    assert r.finish_reason == "stop"
    assert len(r.tokens) == 5 and r.tokens[-1] == im_end
    assert "<|im_end|>" not in r.text


def test_chat_second_turn_prefills_only_the_new_tokens(tiny):
    model, tok = tiny
    (im_start,) = ids_of(tok, "<|im_start|>")
    chat = Chat(model, tok, sampling=GREEDY, max_tokens=6)
    chat.ask("Hello")
    first = render_prompt(tok, chat.messages[:1])
    gen = chat.send("And again?")
    list(gen)
    ids = render_prompt(tok, chat.messages[:-1])
    common = next((j for j, (a, b) in enumerate(zip(ids, first)) if a != b), len(first))
    # the snapshot at the assistant message's <|im_start|>: only that message and the new one run
    restored = max(j for j in range(common + 1) if ids[j] == im_start)
    assert restored > 0 and gen.result.prefilled_tokens == len(ids) - restored
    assert rel_err(np.array(gen.prompt_logits), np.array(prefill(model, ids, model.make_cache()))) < 1e-5


def test_budget_closes_reasoning_with_this_vocabularys_ids(tiny, steer):
    model, tok = tiny
    steer({}, avoid=ids_of(tok, "<|im_end|>", "<|endoftext|>", "<think>", "</think>"))
    r = generate(model, tok, "Think.", think=True, thinking_budget=3, max_tokens=60, sampling=GREEDY)
    closing = tok.encode(CLOSING, add_special_tokens=False)
    assert ids_of(tok, "</think>")[0] in closing
    at = [i for i in range(len(r.tokens)) if r.tokens[i : i + len(closing)] == closing]
    assert len(at) == 1 and 3 <= at[0] <= 3 + 8 and len(r.tokens) > at[0] + len(closing)
    assert all(0 <= t < VOCAB for t in r.tokens)
    assert r.reasoning.endswith(SENTENCE) and r.text and SENTENCE not in r.text


def test_models_own_think_tags_are_seen(tiny, steer):
    model, tok = tiny
    think_open, think_close = ids_of(tok, "<think>", "</think>")
    stops = ids_of(tok, "<|im_end|>", "<|endoftext|>")
    closing = tok.encode(CLOSING, add_special_tokens=False)
    # The model closes its reasoning itself before the budget: nothing is added to the answer.
    steer({1: think_close}, avoid=stops + [think_open])
    r = generate(model, tok, "Think.", think=True, thinking_budget=4, max_tokens=60, sampling=GREEDY)
    assert r.tokens[1] == think_close and len(r.tokens) == 60
    assert SENTENCE not in r.reasoning + r.text and r.text
    # The model opens reasoning while answering: the budget closes it.
    steer({1: think_open}, avoid=stops + [think_close])
    r = generate(model, tok, "Answer.", thinking_budget=2, max_tokens=60, sampling=GREEDY)
    assert r.tokens[1] == think_open
    at = next(i for i in range(len(r.tokens)) if r.tokens[i : i + len(closing)] == closing)
    assert 4 <= at <= 4 + 8 and r.reasoning.endswith(SENTENCE)


def test_generation_stops_at_the_context(tiny, steer):
    model, tok = tiny
    steer({}, avoid=ids_of(tok, "<|im_end|>", "<|endoftext|>"))
    prompt = len(render_prompt(tok, [{"role": "user", "content": "Hello"}]))
    r = generate(model, tok, "Hello", max_tokens=500, sampling=GREEDY)
    assert r.finish_reason == "context"
    assert r.prompt_tokens == prompt and prompt + r.generation_tokens == CONTEXT
    assert stats_line(r).endswith(" │ hit the model's context length")
    # A token limit reached at the same point is still the token limit.
    r = generate(model, tok, "Hello", max_tokens=CONTEXT - prompt, sampling=GREEDY)
    assert r.finish_reason == "length" and r.generation_tokens == CONTEXT - prompt


def test_streamed_text_is_the_result_text(tiny, steer):
    # An answer ending in a newline (held back in case "</think>" follows), under a
    # stop string that holds back the last characters too: all of it comes out once.
    model, tok = tiny
    (newline,) = tok.encode("\n", add_special_tokens=False)
    steer({7: newline}, avoid=ids_of(tok, "<|im_end|>", "<|endoftext|>", "<think>", "</think>"))
    gen = stream_generate(model, tok, "Hello", max_tokens=8, sampling=GREEDY, stop=["never-seen"])
    pieces = list(gen)
    r = gen.result
    assert r.tokens[-1] == newline
    # (the tokenizer's decoding, less the leading space mlx-lm's streaming detokenizer drops)
    assert "".join(p.text for p in pieces) == r.text == tok.decode(r.tokens).removeprefix(" ")
