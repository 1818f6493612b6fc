"""Partial, interleaved multimodal RoPE for the full-attention layers.

Only the first ``rotary_dim`` channels of each head rotate (NeoX pairing of i
with i + rotary_dim/2). Each of the rotary_dim/2 frequencies reads one of three
position axes (time, height, width), interleaved T H W T H W … as
``mrope_section`` prescribes. Text has equal positions on all three axes, which
reduces to ordinary 1-D RoPE; that case takes ``mx.fast.rope``.
"""

from __future__ import annotations

import mlx.core as mx

from ..config import TextConfig


class MRoPE:
    def __init__(self, cfg: TextConfig):
        self.dims = cfg.rotary_dim
        self.base = cfg.rope_theta
        half = self.dims // 2
        self.inv_freq = 1.0 / (self.base ** (mx.arange(0, self.dims, 2, dtype=mx.float32) / self.dims))
        # Axis read by each frequency: H on i ≡ 1 (mod 3), W on i ≡ 2 (mod 3),
        # each only within its section's interleaved span; T everywhere else.
        n_t, n_h, n_w = cfg.mrope_section
        axis = [0] * half
        for i in range(half):
            if i % 3 == 1 and i < 3 * n_h:
                axis[i] = 1
            elif i % 3 == 2 and i < 3 * n_w:
                axis[i] = 2
        self.axis_of_freq = mx.array(axis, dtype=mx.int32)

    def __call__(self, x: mx.array, offset=0, positions: mx.array | None = None) -> mx.array:
        """Rotate ``x`` [B, H, T, D].

        ``positions`` [3, B, T] gives explicit (t, h, w) positions (prompts with
        images); otherwise token i sits at ``offset + i`` on every axis.
        """
        if positions is None:
            return mx.fast.rope(x, self.dims, traditional=False, base=self.base, scale=1.0, offset=offset)
        # [B, T, half]: each frequency's position from its axis
        pos = mx.take(positions.transpose(1, 2, 0), self.axis_of_freq, axis=-1).astype(mx.float32)
        angles = pos * self.inv_freq
        cos = mx.cos(angles)[:, None].astype(x.dtype)
        sin = mx.sin(angles)[:, None].astype(x.dtype)
        half = self.dims // 2
        x1, x2, rest = x[..., :half], x[..., half : self.dims], x[..., self.dims :]
        return mx.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
