"""Speculative decoding with the checkpoint's own MTP head: draft a few tokens, verify them in one forward.

Each round feeds the token just accepted, chained with k tokens the head
drafts, through the model at once (k + 1 positions for about the bytes of
one step), and keeps the longest run of drafts the model agrees with, plus
the model's own next token. It is exact: greedy output is the plain decode's
token for token, and a sampled draft is accepted with probability
min(1, p/q) and replaced on rejection by a draw from the normalised
max(p - q, 0), so tokens follow the model's distribution p (Leviathan et
al. 2023, "Fast Inference from Transformers via Speculative Decoding").
After a rejection every layer goes back to the last accepted token
(:func:`.model.cache.keep`), and the head's KV past it is dropped.

:class:`DraftPolicy` picks k each round from the tokens per second each k
has delivered, so drafting that keeps missing turns itself down to plain
steps (k = 0), trying again now and then.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Collection, Generator, Iterator, Optional, Sequence

import mlx.core as mx

from .model import cache as hybrid
from .model import mtp
from .reasoning import ThinkingControl
from .sampler import logprobs_after, probabilities
from .sampling import Sampling


@dataclass
class DraftStats:
    drafted: int = 0
    accepted: int = 0


class DraftPolicy:
    """How many tokens to draft next: the count whose measured tokens/s is best, its neighbours re-tried now and then.

    The most drafts and none (plain steps) are measured first, so drafts that
    keep missing cost one round before decoding goes plain.
    """

    PROBE = 8  # rounds between tries of a neighbouring count
    EMA = 0.3  # weight of the newest round in a count's rate

    def __init__(self, k_max: int, adaptive: bool = True):
        self.k_max, self.adaptive = k_max, adaptive
        self.k = k_max
        self.rate: dict[int, float] = {}
        self.rounds = 0

    def choose(self) -> int:
        if not self.adaptive:
            return self.k
        untried = [k for k in (self.k_max, 0) if k not in self.rate]
        if untried:
            return untried[0]
        self.rounds += 1
        self.k = max(self.rate, key=self.rate.get)
        if self.rounds % self.PROBE == 0:  # alternately one fewer and one more
            step = 1 if (self.rounds // self.PROBE) % 2 else -1
            return min(max(self.k + step, 0), self.k_max)
        return self.k

    def record(self, k: int, tokens: int, seconds: float) -> None:
        r = tokens / max(seconds, 1e-9)
        # A count in use averages its rounds; a probe's one round replaces an old figure of other conditions.
        self.rate[k] = r if k not in self.rate or k != self.k else (1 - self.EMA) * self.rate[k] + self.EMA * r


def accept(
    ps: list[mx.array], drafts: list[int], qs: list[mx.array], draw: Callable[[mx.array], int], greedy: bool
) -> tuple[int, int]:
    """How many drafts the model accepts, and its token after them.

    ``ps[j]`` is the model's distribution for the token after ``drafts[:j]``
    (k + 1 of them), ``qs[j]`` the one ``drafts[j]`` was drawn from. A draft
    stands with probability min(1, p/q); after a rejection the token is
    drawn from the normalised max(p - q, 0) (greedy: the model's argmax).
    """
    for j, d in enumerate(drafts):
        p = ps[j]
        if greedy:
            ok = d == int(mx.argmax(p).item())
        else:
            ok = mx.random.uniform().item() * qs[j][d].item() < p[d].item()
        if not ok:
            return j, draw(p if greedy else mx.maximum(p - qs[j], 0))
    return len(drafts), draw(ps[len(drafts)])


def draft_head(model, vocab: Optional[int]) -> Callable[[mx.array], mx.array]:
    """The head's output layer: the model's, or its first ``vocab`` rows.

    Byte-level BPE numbers tokens in merge order, so the first ids are
    roughly the commonest (FR-Spec, Zhao et al. 2025, drafts over such a subset).
    """
    lm = model.language_model
    layer = lm.embed_tokens if lm.cfg.tie_word_embeddings else lm.lm_head
    rows = layer.weight.shape[0]
    if vocab is None or vocab >= rows:
        return lm.logits
    part = type(layer).__new__(type(layer))  # the same layer class (and CPU route) over the first rows
    part.__dict__.update(layer.__dict__)
    dict.update(part, {k: v[:vocab] for k, v in layer.items() if isinstance(v, mx.array)})
    product = part.as_linear if hasattr(part, "as_linear") else part
    # -inf beyond them: processors index logits by any token id
    return lambda g: mx.pad(product(g), [(0, 0)] * (g.ndim - 1) + [(0, rows - vocab)], constant_values=-mx.inf)


def speculative_tokens(
    model,
    logits: mx.array,
    cache: list[Any],
    *,
    sampling: Sampling,
    processors: Sequence[Callable],
    control: ThinkingControl,
    max_tokens: int,
    policy: DraftPolicy,
    stats: DraftStats,
    rope_delta: int = 0,
    stop: Collection[int] = (),
    draft_vocab: Optional[int] = None,
    propose: Optional[Callable[[list[int], list[int]], list[int]]] = None,
) -> Iterator[int]:
    """As :func:`.engine.decode_tokens`, drafting with the MTP head (``cache`` ends with its ``MTPCache``).

    A token is fed only once it is accepted and handed out, and the last one
    (a stop token, or the limit's) is not fed, as in plain decoding.
    ``propose(generated, drafts)`` (tests and benches) returns the drafts to
    verify instead of the head's, each as if drawn with certainty.
    """
    lm = model.language_model
    main, mcache = cache[:-1], cache[-1]
    head = draft_head(model, draft_vocab)
    greedy = sampling.temperature == 0
    generated: list[int] = []

    def dist(row: mx.array, history: list[int]) -> mx.array:
        """The distribution [V] a token is drawn from, after ``history``."""
        return probabilities(logprobs_after(row, processors, history), sampling)[0]

    def draw(p: mx.array) -> int:
        return int(mx.argmax(p).item()) if greedy else int(mx.random.categorical(mx.log(p)).item())

    def run(tokens: list[int], record: bool = False) -> tuple[mx.array, mx.array]:
        """Run ``tokens`` through the model: their hidden states [1, T, H] and logits [T, V]."""
        hybrid.record(main, record)
        h = lm.hidden_states(mx.array(tokens)[None], main, rope_delta=rope_delta)
        hybrid.record(main, False)
        return h, lm.logits(h)[0]

    def feed(tokens: list[int]) -> int:
        """Feed accepted ``tokens`` plainly; the model's next token."""
        h, rows = run(tokens)
        mtp.append(mcache, h, mx.array(tokens)[None])
        return draw(dist(rows[-1], generated))

    def draft(token: int, k: int) -> tuple[list[int], list[mx.array]]:
        """k tokens chained by the head after ``token``, and the distributions they were drawn from."""
        g = mtp.catch_up(model, mcache, mx.array([token]), rope_delta)
        tokens, qs = [], []
        for j in range(k):
            qs.append(dist(head(g)[0], generated + tokens))
            tokens.append(draw(qs[-1]))
            if j + 1 < k:
                g = model.mtp(lm.embed(mx.array([[tokens[-1]]])), g[:, None], mcache, rope_delta)[:, -1]
        if propose is not None:
            tokens = propose(generated, tokens)
            qs = [mx.zeros(q.shape).at[t].add(1.0) for q, t in zip(qs, tokens)]
        return tokens, qs

    def closing(forced: list[int]) -> Generator[int, None, Optional[int]]:
        """Hand out and feed the closing of reasoning as one chunk; the model's next token (None at the limit)."""
        forced = forced[: max_tokens - len(generated)]
        generated.extend(forced)
        yield from forced
        return None if len(generated) == max_tokens else feed(forced)

    y = draw(dist(logits, generated))
    while True:
        forced = control.observe(y)
        if forced is not None:
            y = yield from closing(forced)
            if y is None:
                return
            continue
        generated.append(y)
        yield y
        if y in stop or len(generated) == max_tokens:
            return
        k = min(policy.choose(), max_tokens - len(generated))
        if k == 0:
            start = time.perf_counter()
            y = feed([y])
            policy.record(0, 1, time.perf_counter() - start)
            continue
        start, before = time.perf_counter(), hybrid.offset(main)
        drafts, qs = draft(y, k)
        h, rows = run([y] + drafts, record=True)
        ps = [dist(rows[j], generated + drafts[:j]) for j in range(k + 1)]
        accepted, y_next = accept(ps, drafts, qs, draw, greedy)
        policy.record(k, 1 + accepted, time.perf_counter() - start)
        stats.drafted += k
        stats.accepted += accepted
        # Accepted drafts go out one by one as sampled tokens would: reasoning control, a stop or the limit may cut
        # them. The layers keep what went out (a stop token, or the limit's, not fed), even if the caller stops here.
        kept, forced, last = 0, None, False
        try:
            for d in drafts[:accepted]:
                forced = control.observe(d)
                if forced is not None:
                    break
                generated.append(d)
                last = d in stop or len(generated) == max_tokens
                kept += not last
                yield d
                if last:
                    break
        finally:
            hybrid.keep(main, before, 1 + kept)
            mcache.rewind(before)  # the draft chain's entries go; the kept tokens' states are pending
            mtp.append(mcache, h[:, : 1 + kept], mx.array([y] + drafts[:kept])[None])
        if last:
            return
        y = y_next
        if forced is not None:
            y = yield from closing(forced)
            if y is None:
                return
