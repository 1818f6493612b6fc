"""The multi-token-prediction head and the cache that keeps it in step with the model.

The head predicts the token after next. Its input at position p pairs the
main model's final (normed) hidden state at p with the embedding of token
p + 1: each normed by its own RMSNorm, concatenated (embedding first), and
projected by ``fc`` back to the hidden size; then one full-attention decoder
layer with its own KV at position p, a final norm, and the shared output
head. Chained, its output hidden state pairs with the token it drafted.
(vLLM's ``qwen3_next_mtp.py`` is the reading this follows.)

The head's KV lags the model: entry p needs token p + 1, so it is written
only once that token is known. :class:`MTPCache` therefore also holds the
main model's hidden states it has yet to pair, and the tokens that pair with
all but the last of them; whoever runs the model hands them over
(:func:`append`), and :func:`catch_up` writes the pairs once the next token
is known. The KV entries plus the pending states always count the tokens
the model holds, which is what the cache reports, so chats, snapshots and
session files treat it as one more layer.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask

from ..config import TextConfig
from .cache import AttentionCache
from .text import DecoderLayer, RMSNorm


class MTP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        h = cfg.hidden_size
        self.fc = nn.Linear(2 * h, h, bias=False)
        self.pre_fc_norm_embedding = RMSNorm(h, cfg.rms_norm_eps)
        self.pre_fc_norm_hidden = RMSNorm(h, cfg.rms_norm_eps)
        self.layers = [DecoderLayer(cfg, "full_attention") for _ in range(cfg.mtp_num_hidden_layers)]
        self.norm = RMSNorm(h, cfg.rms_norm_eps)

    def __call__(self, embeddings: mx.array, hidden: mx.array, cache: "MTPCache", rope_delta: int = 0) -> mx.array:
        """Normed hidden states [B, T, H] for T (hidden at p, embedding of token p + 1) pairs, p from ``cache.offset``.

        Positions run on from the cache (plus ``rope_delta`` after an image),
        as text positions do in the model; image tokens get these sequential
        positions too, which can only cost drafts, never correctness.
        """
        x = mx.concatenate([self.pre_fc_norm_embedding(embeddings), self.pre_fc_norm_hidden(hidden)], axis=-1)
        x = self.fc(x)
        mask = create_attention_mask(x, cache)
        for layer in self.layers:  # Qwen3.5 has one; more would share this cache's positions
            x = layer(x, cache, mask, None, rope_delta)
        return self.norm(x)


class MTPCache(AttentionCache):
    """The head's KV (``k0``, ``v0``), plus the model's hidden states not yet paired (``h``) and their tokens (``t``)."""

    def __init__(self):
        super().__init__()
        self.hidden: Optional[mx.array] = None  # [B, P, H]
        self.tokens: Optional[mx.array] = None  # [B, P - 1] int32: the tokens after all but the last pending state

    @property
    def pending(self) -> int:
        return 0 if self.hidden is None else self.hidden.shape[1]

    @property
    def state(self) -> dict:
        arrays = AttentionCache.state.fget(self)
        if self.hidden is not None:
            arrays.update(h=self.hidden, t=self.tokens)
        return arrays

    @state.setter
    def state(self, arrays: dict) -> None:
        AttentionCache.state.fset(self, {k: v for k, v in arrays.items() if k not in ("h", "t")})
        self.hidden, self.tokens = arrays.get("h"), arrays.get("t")

    @property
    def meta_state(self) -> int:
        return self.offset + self.pending  # the tokens the model holds

    @meta_state.setter
    def meta_state(self, value: int) -> None:
        pass  # the arrays say it all: set with the state

    def snapshot(self) -> dict:
        return {} if self.hidden is None else {"h": self.hidden, "t": self.tokens}

    def restore(self, snapshot: dict, n_tokens: int) -> None:
        self.hidden, self.tokens = snapshot.get("h"), snapshot.get("t")
        self.trim(self.offset - (n_tokens - self.pending))

    def rewind(self, entries: int) -> None:
        """Keep the first ``entries`` KV entries and nothing pending (before :func:`append` sets what is)."""
        self.trim(self.offset - entries)
        self.hidden = self.tokens = None


def append(cache: MTPCache, hidden: mx.array, tokens: mx.array) -> None:
    """Hand over the model's hidden states [B, T, H] for ``tokens`` [B, T], the tokens it just ran.

    Each token pairs with the hidden state before it: the last pending one,
    then these. With nothing pending (an empty cache), the first token has
    no state before it and pairs with nothing.
    """
    tokens = tokens.astype(mx.int32)
    if cache.hidden is None:
        cache.hidden, cache.tokens = hidden, tokens[:, 1:]
        return
    cache.tokens = mx.concatenate([cache.tokens, tokens], axis=1)
    cache.hidden = mx.concatenate([cache.hidden, hidden], axis=1)


def catch_up(model, cache: MTPCache, token: Optional[mx.array] = None, rope_delta: int = 0) -> Optional[mx.array]:
    """Write the KV of every pending pair, ``token`` [B] pairing with the last state; the head's last output [B, H].

    Without ``token`` the last state stays pending (its token is not known yet)
    and None is returned when nothing else was pending.
    """
    tokens = cache.tokens if token is None else mx.concatenate([cache.tokens, token[:, None].astype(mx.int32)], 1)
    n = tokens.shape[1]
    if n == 0:
        return None
    hidden = cache.hidden[:, :n]
    cache.hidden, cache.tokens = cache.hidden[:, n:], tokens[:, n:]
    if cache.hidden.shape[1] == 0:
        cache.hidden = cache.tokens = None
    out = model.mtp(model.language_model.embed(tokens), hidden, cache, rope_delta)
    return out[:, -1]
