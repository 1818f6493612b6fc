"""From :class:`~mlx_qwen35.sampling.Sampling` settings to a sampler and logits processors."""

from __future__ import annotations

from typing import Callable

import mlx.core as mx
from mlx_lm.sample_utils import make_logits_processors
from mlx_lm.sample_utils import make_sampler as mlx_lm_sampler

from .sampling import Sampling


def make_sampler(s: Sampling) -> Callable[[mx.array], mx.array]:
    """Log-probabilities [1, V] → a token [1].

    As vLLM orders it (the setting behind the model card's numbers):
    temperature, then top-k, then top-p and min-p over the renormalised top-k.
    With top-k on, only those k candidates are sorted: mlx-lm's sampler sorts
    all 248k logits for top-p, which costs ~80 ms a token on a CPU.
    """
    if s.temperature == 0:
        return lambda logprobs: mx.argmax(logprobs, axis=-1)
    if s.top_k == 0:
        return mlx_lm_sampler(temp=s.temperature, top_p=s.top_p, min_p=s.min_p)
    k, inv_t, top_p, min_p = s.top_k, 1.0 / s.temperature, s.top_p, s.min_p

    def sample(logprobs: mx.array) -> mx.array:
        x = logprobs * inv_t
        kk = min(k, x.shape[-1])
        idx = mx.argpartition(-x, kth=kk - 1, axis=-1)[:, :kk]
        v = mx.take_along_axis(x, idx, axis=-1)
        order = mx.argsort(-v, axis=-1)
        v, idx = mx.take_along_axis(v, order, axis=-1), mx.take_along_axis(idx, order, axis=-1)
        p = mx.softmax(v, axis=-1)
        keep = (mx.cumsum(p, axis=-1) - p) < top_p  # the smallest prefix reaching top_p
        if min_p > 0:
            keep = keep & (p >= min_p * p[:, :1])
        choice = mx.random.categorical(mx.where(keep, v, -mx.inf))
        return mx.take_along_axis(idx, choice[:, None], axis=-1)[:, 0]

    return sample


def make_processors(s: Sampling, max_tokens: int) -> list[Callable[[mx.array, mx.array], mx.array]]:
    """The penalties of ``s`` as mlx-lm logits processors ``(tokens so far, logits) → logits``."""
    return make_logits_processors(
        repetition_penalty=None if s.repetition_penalty == 1 else s.repetition_penalty,
        presence_penalty=s.presence_penalty or None,
        # Presence counts the whole answer, as the model card's OpenAI-style setting means.
        presence_context_size=max_tokens,
    )
