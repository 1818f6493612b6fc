"""Steer a tiny random model's output: a logits processor that forces a target text, token by token.

The model still runs every step (its logits are only masked), so the cache,
the streaming and the parsing see exactly what a real model writing that text
would produce.
"""

from __future__ import annotations

from typing import Sequence

import mlx.core as mx


def forcing(tokenizer, text: str, *, then: Sequence[str] = ("<|im_end|>",)):
    """A processor ``(tokens, logits) → logits`` that leaves only token ``i`` of ``text`` (+ ``then``) at step ``i``.

    Past the target it keeps forcing the last token (the end of the turn).
    Step ``i`` counts the tokens of this reply so far, as the engine passes them.
    """
    ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.convert_tokens_to_ids(t) for t in then]

    def force(tokens: mx.array, logits: mx.array) -> mx.array:
        target = ids[min(tokens.size, len(ids) - 1)]
        keep = mx.arange(logits.shape[-1]) == target
        return mx.where(keep, logits, -mx.inf)

    force.ids = ids
    return force


def scripted(tokenizer, replies: Sequence[str]):
    """A processor that forces ``replies[k]`` in the k-th generation it serves (the last one after that).

    A generation starts when the processor sees no tokens of the reply yet.
    """
    rounds = [forcing(tokenizer, r) for r in replies]
    state = {"round": -1}

    def force(tokens: mx.array, logits: mx.array) -> mx.array:
        if tokens.size == 0:
            state["round"] += 1
        return rounds[min(state["round"], len(rounds) - 1)](tokens, logits)

    force.rounds = rounds
    return force
