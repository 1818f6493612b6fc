"""From :class:`~mlx_qwen35.sampling.Sampling` settings to a sampler and logits processors."""

from __future__ import annotations

from typing import Callable

import mlx.core as mx
from mlx_lm.sample_utils import make_logits_processors

from .sampling import Sampling


def candidates(logprobs: mx.array, s: Sampling) -> tuple[mx.array, mx.array]:
    """The tokens [N, k] a non-greedy ``s`` may draw from log-probabilities [N, V], and their probabilities [N, k].

    As vLLM orders it (the setting behind the model card's numbers):
    temperature, then top-k (all tokens when 0), then top-p and min-p over the
    renormalised top-k. Only the k candidates are sorted: sorting all 248k
    logits costs ~80 ms a token on a CPU.
    """
    x = logprobs * (1.0 / s.temperature)
    k = min(s.top_k or x.shape[-1], x.shape[-1])
    idx = mx.argpartition(-x, kth=k - 1, axis=-1)[:, :k] if k < x.shape[-1] else mx.broadcast_to(mx.arange(k), x.shape)
    v = mx.take_along_axis(x, idx, axis=-1)
    order = mx.argsort(-v, axis=-1)
    v, idx = mx.take_along_axis(v, order, axis=-1), mx.take_along_axis(idx, order, axis=-1)
    p = mx.softmax(v, axis=-1)
    keep = (mx.cumsum(p, axis=-1) - p) < s.top_p  # the smallest prefix reaching top_p
    if s.min_p > 0:
        keep = keep & (p >= s.min_p * p[:, :1])
    p = mx.where(keep, p, 0)
    return idx, p / p.sum(axis=-1, keepdims=True)


def make_sampler(s: Sampling) -> Callable[[mx.array], mx.array]:
    """Log-probabilities [N, V] → tokens [N], drawn from :func:`probabilities`."""
    if s.temperature == 0:
        return lambda logprobs: mx.argmax(logprobs, axis=-1)

    def sample(logprobs: mx.array) -> mx.array:
        idx, p = candidates(logprobs, s)
        choice = mx.random.categorical(mx.log(p))
        return mx.take_along_axis(idx, choice[:, None], axis=-1)[:, 0]

    return sample


def probabilities(logprobs: mx.array, s: Sampling) -> mx.array:
    """The distribution [N, V] that ``s`` samples from log-probabilities [N, V] (one-hot when greedy)."""
    if s.temperature == 0:
        idx, p = mx.argmax(logprobs, axis=-1, keepdims=True), mx.ones((logprobs.shape[0], 1))
    else:
        idx, p = candidates(logprobs, s)
    rows = mx.arange(logprobs.shape[0])[:, None]
    return mx.zeros(logprobs.shape, dtype=mx.float32).at[rows, idx].add(p)


def logprobs_after(logits: mx.array, processors, history: list[int]) -> mx.array:
    """One sequence's log-probabilities [1, V] from its logits [V], the ``processors`` run after ``history``."""
    for p in processors:
        logits = p(mx.array(history, dtype=mx.int32), logits[None])[0]
    return (logits - mx.logsumexp(logits, keepdims=True))[None]


def make_processors(s: Sampling, max_tokens: int) -> list[Callable[[mx.array, mx.array], mx.array]]:
    """The penalties of ``s`` as mlx-lm logits processors ``(tokens so far, logits) → logits``."""
    return make_logits_processors(
        repetition_penalty=None if s.repetition_penalty == 1 else s.repetition_penalty,
        presence_penalty=s.presence_penalty or None,
        # Presence counts the whole answer, as the model card's OpenAI-style setting means.
        presence_context_size=max_tokens,
    )
