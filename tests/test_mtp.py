"""Speculative decoding with the MTP head: the same tokens as plain decoding, the model's distribution when sampling.

Plain greedy decoding is the independent reference: drafting may only change
how many forwards run, never a token. A random head rarely drafts right, so
``propose`` (a draft right on chosen steps, from the plain output) drives the
accept path; sampling is checked against distributions computed directly.
"""

from __future__ import annotations

import shutil

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import TEXT, add_mtp, mtp_tensors

from mlx_qwen35 import Chat, generate
from mlx_qwen35.engine import decode_tokens, prefill
from mlx_qwen35.loading import load
from mlx_qwen35.model import cache as hybrid
from mlx_qwen35.reasoning import ThinkingControl
from mlx_qwen35.sampler import make_sampler, probabilities
from mlx_qwen35.sampling import Sampling
from mlx_qwen35.speculative import DraftPolicy, DraftStats, accept, speculative_tokens

GREEDY = Sampling(temperature=0)
# The chi-square distribution's 0.999 quantiles by degrees of freedom: a correct sampler fails once in 1000 runs
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32, 8: 26.12}
PROMPT = list(range(300, 340))


@pytest.fixture(scope="module")
def mtp_dir(chat_model_dir, tmp_path_factory):
    """The chat model's folder with a random MTP head added."""
    path = tmp_path_factory.mktemp("mtp_model")
    for f in chat_model_dir.iterdir():
        shutil.copyfile(f, path / f.name)
    add_mtp(path, dict(TEXT, vocab_size=248320))
    return path


@pytest.fixture(scope="module")
def mtp_model(mtp_dir):
    model, tok = load(mtp_dir, mtp=True)
    assert model.has_mtp
    return model, tok


def plain(model, n, control=None, stop=()):
    cache = model.make_cache()
    logits = prefill(model, PROMPT, cache)
    control = control or ThinkingControl(None, reasoning=False, budget=None)
    out = list(decode_tokens(model, logits, cache, sampler=make_sampler(GREEDY), processors=[], control=control,
                             max_tokens=n, stop=stop))
    return out, cache


def drafted(model, n, k, propose=None, control=None, stop=()):
    cache = model.make_cache(mtp=True)
    logits = prefill(model, PROMPT, cache)
    control = control or ThinkingControl(None, reasoning=False, budget=None)
    stats = DraftStats()
    out = list(speculative_tokens(model, logits, cache, sampling=GREEDY, processors=[], control=control,
                                  max_tokens=n, policy=DraftPolicy(k, adaptive=False), stats=stats,
                                  stop=stop, propose=propose))
    return out, cache, stats


def right_on(reference, steps):
    """A draft that is the reference's token where ``steps(position)`` holds, else a wrong one."""
    def propose(generated, drafts):
        at = [len(generated) + j for j in range(len(drafts))]
        return [reference[i] if i < len(reference) and steps(i) else (reference[i] + 1 if i < len(reference) else 0)
                for i in at]
    return propose


@pytest.mark.parametrize(
    "k, hits",
    [(k, "even") for k in (1, 2, 3, 4)] + [(k, h) for k in (1, 4) for h in ("head", "always", "never")],
)
def test_greedy_drafting_equals_plain_decoding(mtp_model, k, hits):
    model, _ = mtp_model
    ref, ref_cache = plain(model, 24)
    propose = None if hits == "head" else right_on(ref, {"always": lambda i: True, "even": lambda i: i % 2 == 0,
                                                         "never": lambda i: False}[hits])
    out, cache, stats = drafted(model, 24, k, propose)
    assert out == ref
    assert stats.drafted > 0
    if hits == "always":
        assert stats.accepted == stats.drafted  # every round accepts all k
    if hits == "never":
        assert stats.accepted == 0
    if hits == "even":
        assert 0 < stats.accepted < stats.drafted
    # Every layer holds what plain decoding's does: the same token count, the same recurrent state
    assert hybrid.offset(cache) == hybrid.offset(ref_cache) == len(PROMPT) + len(ref) - 1
    for ours, theirs in zip(cache, ref_cache):
        for name, a in theirs.state.items():
            np.testing.assert_allclose(np.array(ours.state[name]), np.array(a), rtol=1e-4, atol=1e-5)


def test_stop_token_inside_accepted_drafts_ends_there(mtp_model):
    model, _ = mtp_model
    ref, _ = plain(model, 24)
    stop = {ref[5]}
    expected = ref[: ref.index(ref[5]) + 1]
    out, cache, _ = drafted(model, 24, 4, right_on(ref, lambda i: True), stop=stop)
    assert out == expected
    assert hybrid.offset(cache) == len(PROMPT) + len(expected) - 1  # the stop token is not fed


def test_thinking_budget_cuts_accepted_drafts_as_plain_decoding_does(mtp_model):
    model, tok = mtp_model
    make = lambda: ThinkingControl(tok, reasoning=True, budget=5)
    ref, _ = plain(model, 30, control=make())
    assert tok.encode("</think>", add_special_tokens=False)[0] in ref  # the budget closed reasoning
    out, _, stats = drafted(model, 30, 3, right_on(ref, lambda i: True), control=make())
    assert out == ref and stats.accepted > 0


@pytest.mark.parametrize("think", [False, True])
def test_generate_with_mtp_equals_without(mtp_model, think):
    model, tok = mtp_model
    opts = dict(max_tokens=20, sampling=GREEDY, think=think)
    off = generate(model, tok, "Tell me about owls.", mtp=False, **opts)
    for k in (1, 3):
        on = generate(model, tok, "Tell me about owls.", mtp=True, num_draft_tokens=k, **opts)
        assert on.tokens == off.tokens and on.text == off.text and on.reasoning == off.reasoning
        assert on.draft_tokens > 0 and off.draft_tokens == 0


@pytest.mark.parametrize("kv_bits", [None, 8])
def test_chat_with_snapshots_and_save_load_equals_plain(mtp_model, tmp_path, kv_bits):
    model, tok = mtp_model
    turns = ["Hello there.", "What is a heron?", "And a crane?"]
    settings = dict(max_tokens=12, sampling=GREEDY, kv_bits=kv_bits, num_draft_tokens=2)
    plain_chat, mtp_chat = Chat(model, tok, mtp=False, **settings), Chat(model, tok, mtp=True, **settings)
    for i, content in enumerate(turns):
        if i == 2:  # resume both from files mid-conversation
            plain_chat.save(tmp_path / "plain.safetensors")
            mtp_chat.save(tmp_path / "mtp.safetensors")
            plain_chat = Chat.load(tmp_path / "plain.safetensors", model, tok)
            mtp_chat = Chat.load(tmp_path / "mtp.safetensors", model, tok)
        a, b = plain_chat.ask(content), mtp_chat.ask(content)
        assert b.tokens == a.tokens
        assert b.draft_tokens > 0
        if i:
            assert b.prefilled_tokens == a.prefilled_tokens < b.prompt_tokens  # the cache carried on
    # A rewind to an earlier snapshot (a different last message) gives the same reply both ways
    plain_chat.messages, mtp_chat.messages = plain_chat.messages[:2], mtp_chat.messages[:2]
    assert mtp_chat.ask("Something else.").tokens == plain_chat.ask("Something else.").tokens


def test_session_without_the_heads_layer_loads_into_a_model_with_it(mtp_model, chat_model, tmp_path):
    model, tok = mtp_model
    base, _ = chat_model
    saved = Chat(base, tok, max_tokens=8, sampling=GREEDY)
    first = saved.ask("Hi.")
    saved.save(tmp_path / "s.safetensors")
    # a model without the head saved it; one with the head resumes it (and decodes plainly)
    resumed = Chat.load(tmp_path / "s.safetensors", model, tok)
    again = Chat.load(tmp_path / "s.safetensors", base, tok)
    assert resumed.ask("More.").tokens == again.ask("More.").tokens
    assert first.tokens


def test_mtp_without_a_head_is_one_clear_error(chat_model):
    from mlx_qwen35.errors import Qwen35Error

    model, tok = chat_model
    if model.has_mtp:
        pytest.skip("the default load has the head on this device")
    with pytest.raises(Qwen35Error, match="^mtp: this model has no MTP head"):
        generate(model, tok, "Hi", mtp=True, max_tokens=2)


def test_acceptance_rule_gives_the_models_distribution():
    """Drafts drawn from q, accepted by min(1, p/q), replaced from max(p - q, 0): the first token follows p."""
    mx.random.seed(0)
    p = mx.array([0.5, 0.2, 0.2, 0.1, 0.0])
    q = mx.array([0.1, 0.1, 0.2, 0.3, 0.3])
    draw = lambda dist: int(mx.random.categorical(mx.log(dist)).item())
    n = 4000
    counts = np.zeros(5)
    for _ in range(n):
        d = draw(q)
        accepted, nxt = accept([p, p], [d], [q], draw, greedy=False)
        counts[d if accepted else nxt] += 1
    expected = np.array(p) * n
    chi2 = (((counts - expected) ** 2) / np.where(expected > 0, expected, 1))[:4].sum()
    assert counts[4] == 0
    assert chi2 < CHI2_999[3]


def test_sampled_tokens_follow_the_target_distribution(mtp_model):
    """Two sampled tokens with drafting (a fixed, often wrong draft) against the model's own two-step distribution."""
    model, _ = mtp_model
    s = Sampling(temperature=1.0, top_k=3, top_p=1.0)
    cache = model.make_cache()
    logits = prefill(model, PROMPT, cache)
    p1 = np.array(probabilities((logits - mx.logsumexp(logits))[None], s)[0])
    firsts = np.flatnonzero(p1)
    joint = {}
    for a in firsts:
        c = model.make_cache()
        prefill(model, PROMPT, c)
        row = model(mx.array([[int(a)]]), cache=c)[0, -1]
        p2 = np.array(probabilities((row - mx.logsumexp(row))[None], s)[0])
        for b in np.flatnonzero(p2):
            joint[(int(a), int(b))] = p1[a] * p2[b]
    second_choice = {int(a): int(np.argsort(-np.array(p1))[1]) for a in firsts}  # a plausible token, often wrong
    mx.random.seed(1)
    n, counts = 300, {}
    c = model.make_cache(mtp=True)
    lg = prefill(model, PROMPT, c)
    start = hybrid.snapshot(c)
    for _ in range(n):
        hybrid.restore(c, start, len(PROMPT))  # each run from the prompt's cache
        out = list(speculative_tokens(
            model, lg, c, sampling=s, processors=[], control=ThinkingControl(None, reasoning=False, budget=None),
            max_tokens=2, policy=DraftPolicy(1, adaptive=False), stats=DraftStats(),
            propose=lambda gen, d: [second_choice[gen[0]]],
        ))
        counts[tuple(out)] = counts.get(tuple(out), 0) + 1
    assert set(counts) <= set(joint)
    cells = [(joint[key] * n, counts.get(key, 0)) for key in joint]
    chi2 = sum((o - e) ** 2 / e for e, o in cells if e >= 1)
    dof = sum(e >= 1 for e, _ in cells) - 1
    assert chi2 < CHI2_999[dof], (chi2, dof)


def test_head_matches_its_definition_on_transformers_layers(mtp_model):
    """The head's output for (hidden, next token) pairs against the same weights in transformers' own modules:
    its RMSNorms, a full-attention decoder layer and rotary embedding, with the fc and concatenation order as
    vLLM's Qwen3-Next MTP reads them (embedding first)."""
    import torch
    from transformers.models.qwen3_5.modeling_qwen3_5 import (
        Qwen3_5DecoderLayer,
        Qwen3_5RMSNorm,
        Qwen3_5TextConfig,
        Qwen3_5TextRotaryEmbedding,
    )

    from conftest import rel_err
    from mlx_qwen35.model.mtp import MTPCache

    model, _ = mtp_model
    text = dict(TEXT, vocab_size=248320)
    w = {k: torch.from_numpy(v) for k, v in mtp_tensors(text, 1).items()}  # add_mtp's head
    cfg = Qwen3_5TextConfig(**text)
    full = cfg.layer_types.index("full_attention")
    layer = Qwen3_5DecoderLayer(cfg, full).eval()
    layer.load_state_dict({k[len("mtp.layers.0."):]: v for k, v in w.items() if k.startswith("mtp.layers.0.")})
    norm = lambda name: Qwen3_5RMSNorm(text["hidden_size"], cfg.rms_norm_eps).eval()
    norms = {n: norm(n) for n in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm")}
    for n, m in norms.items():
        m.weight.data = w[f"mtp.{n}.weight"]

    T = 7
    tokens = mx.array([[11, 500, 4000, 17, 248000, 9, 31]])
    hidden = mx.random.normal((1, T, text["hidden_size"]), key=mx.random.key(3))
    ours = model.mtp(model.language_model.embed(tokens), hidden, MTPCache())
    e = torch.from_numpy(np.array(model.language_model.embed(tokens)))
    h = torch.from_numpy(np.array(hidden))
    with torch.no_grad():
        x = torch.cat([norms["pre_fc_norm_embedding"](e), norms["pre_fc_norm_hidden"](h)], dim=-1) @ w["mtp.fc.weight"].T
        positions = torch.arange(T)[None, None].expand(3, 1, T)
        rope = Qwen3_5TextRotaryEmbedding(cfg)(x, positions)
        mask = torch.full((T, T), float("-inf")).triu(1)[None, None]
        ref = norms["norm"](layer(x, position_embeddings=rope, attention_mask=mask, position_ids=positions))
    assert rel_err(ours, ref.numpy()) < 1e-5


def test_repl_mtp_command_and_acceptance_in_the_figures(mtp_model, chat_model):
    from test_repl import output, repl_for

    from mlx_qwen35.figures import stats_line

    model, tok = mtp_model
    chat = Chat(model, tok, sampling=GREEDY, max_tokens=10)
    repl = repl_for(chat, ["/mtp 3", "Hello.", "/mtp off", "Hi.", "/mtp maybe", "/mtp 9", "/mtp"])
    repl.run()
    out = output(repl)
    drafted, plain = chat.history
    assert drafted.draft_tokens > 0 and plain.draft_tokens == 0
    assert "speculative decoding on, up to 3 drafts a step" in out
    assert f"drafts {drafted.accepted_draft_tokens}/{drafted.draft_tokens} accepted" in stats_line(drafted)
    assert stats_line(drafted) in out and "drafts" not in stats_line(plain)
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: /mtp: expected on, off or a number of drafts from 1 to 8, got 'maybe'",
        "error: /mtp: expected on, off or a number of drafts from 1 to 8, got '9'",
    ]
    assert out.rstrip().endswith("speculative decoding off")
    base, _ = chat_model
    if not base.has_mtp:
        repl = repl_for(Chat(base, tok, max_tokens=4), ["/mtp on"])
        repl.run()
        assert "error: /mtp: this model has no MTP head loaded (start with --mtp)" in output(repl)


def test_cli_generate_with_mtp(mtp_dir, chat_model_dir):
    import json

    from test_cli import invoke

    args = ["generate", "--prompt", "Name a bird.", "--temp", "0", "--max-tokens", "12", "--json"]
    off = invoke(*args, "--model", mtp_dir, "--no-mtp")
    on = invoke(*args, "--model", mtp_dir, "--mtp", "--num-draft-tokens", "3")
    assert off.exit_code == 0 and on.exit_code == 0, on.output
    off, on = json.loads(off.stdout.splitlines()[-1]), json.loads(on.stdout.splitlines()[-1])
    assert on["text"] == off["text"] and on["stats"]["generation_tokens"] == off["stats"]["generation_tokens"]
    assert on["stats"]["draft_tokens"] > 0 and off["stats"]["draft_tokens"] == 0
    headless = invoke(*args, "--model", chat_model_dir, "--mtp")
    assert headless.exit_code != 0
    assert "mtp: this model has no MTP head" in headless.output and "Traceback" not in headless.output


def test_policy_goes_plain_when_drafts_miss_and_back_when_they_hit():
    policy = DraftPolicy(3)
    assert policy.choose() == 3
    policy.record(3, 1, 1.5)  # every draft missed: one token for 1.5 steps
    assert policy.choose() == 0
    policy.record(0, 1, 1.0)
    picks = []
    for _ in range(32):
        k = policy.choose()
        picks.append(k)
        policy.record(k, 1, 1.0 if k == 0 else 1.5)
    assert picks.count(0) >= 28  # the rest re-try drafting now and then
    for _ in range(80):  # drafts start to hit: 3.4 tokens for 1.6 steps (one more draft is tried every 16 rounds)
        k = policy.choose()
        policy.record(k, {0: 1, 1: 1.9, 2: 2.7, 3: 3.4}[k], 1.0 if k == 0 else 1.2 + 0.13 * k)
    assert policy.k == 3


@pytest.mark.parametrize("vocab", [1000, 248320])
def test_a_truncated_draft_head_keeps_the_output(mtp_model, vocab):
    model, tok = mtp_model
    opts = dict(max_tokens=12, sampling=GREEDY)
    off = generate(model, tok, "Tell me about owls.", mtp=False, **opts)
    on = generate(model, tok, "Tell me about owls.", mtp=True, draft_vocab=vocab, **opts)
    assert on.tokens == off.tokens and on.draft_tokens > 0


def test_penalties_act_on_drafted_tokens_as_on_sampled_ones(mtp_model):
    """Greedy with the instruct preset's presence penalty and a repetition penalty: the history of each verified
    position includes the drafts before it."""
    model, tok = mtp_model
    s = Sampling(temperature=0, presence_penalty=2.0, repetition_penalty=1.3)
    off = generate(model, tok, "Count: one one one", mtp=False, max_tokens=16, sampling=s)
    on = generate(model, tok, "Count: one one one", mtp=True, num_draft_tokens=3, max_tokens=16, sampling=s)
    assert on.tokens == off.tokens and on.draft_tokens > 0
    # and with drafts that are right, so penalised positions are verified after accepted drafts
    from mlx_qwen35.sampler import make_processors

    procs = make_processors(s, 24)
    cache = model.make_cache()
    logits = prefill(model, PROMPT, cache)
    control = ThinkingControl(None, reasoning=False, budget=None)
    ref = list(decode_tokens(model, logits, cache, sampler=make_sampler(s), processors=procs, control=control,
                             max_tokens=24))
    cache = model.make_cache(mtp=True)
    logits = prefill(model, PROMPT, cache)
    stats = DraftStats()
    out = list(speculative_tokens(model, logits, cache, sampling=s, processors=procs, control=control, max_tokens=24,
                                  policy=DraftPolicy(3, adaptive=False), stats=stats,
                                  propose=right_on(ref, lambda i: i % 3 != 2)))
    assert out == ref and stats.accepted > 0
