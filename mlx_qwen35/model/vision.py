"""The Qwen3.5 vision tower: patches in, one language-model token per 2×2 block out.

Patches arrive flattened (C, T, P, P) and ordered in merge blocks (block row,
block column, row in block, column in block), as the processor emits them; a
grid (t, h, w) counts patches. Each patch gets a learned position — the
square table resampled bilinearly (align_corners) to the grid — and a 2-D
rotary (row angles on the first half of each head's frequencies, column
angles on the second). Attention never crosses a frame; the merger then
concatenates each 2×2 block into one vector and projects it to the text width.
"""

from __future__ import annotations

import functools
from typing import Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..config import VisionConfig
from ..errors import Qwen35Error

ROPE_THETA = 10000.0
LN_EPS = 1e-6


@functools.lru_cache(maxsize=64)
def _block_order(h: int, w: int, merge: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) of each patch of an h×w grid, in merge-block order."""
    br, bc, ir, ic = np.meshgrid(
        np.arange(h // merge), np.arange(w // merge), np.arange(merge), np.arange(merge), indexing="ij"
    )
    return (br * merge + ir).reshape(-1), (bc * merge + ic).reshape(-1)


def _axis_taps(index: np.ndarray, size: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Two bilinear taps (align_corners) into a ``side``-long axis for target ``index`` of ``size``."""
    src = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
    floor = np.floor(src)
    offsets = np.arange(2, dtype=np.float32)
    taps = np.clip(floor[:, None] + offsets, 0, side - 1).astype(np.int32)
    weights = np.clip(1 - np.abs(src[:, None] - floor[:, None] - offsets), 0, None)
    return taps, weights.astype(np.float32)


@functools.lru_cache(maxsize=64)
def _frame_tables(h: int, w: int, merge: int, side: int, head_dim: int):
    """Per-frame constants: position-table taps and weights [h·w, 4], rotary cos/sin [h·w, head_dim]."""
    rows, cols = _block_order(h, w, merge)
    h_taps, h_w = _axis_taps(rows, h, side)
    w_taps, w_w = _axis_taps(cols, w, side)
    taps = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
    weights = (h_w[:, :, None] * w_w[:, None, :]).reshape(-1, 4)

    quarter = head_dim // 4
    inv_freq = 1.0 / (ROPE_THETA ** (np.arange(0, 2 * quarter, 2, dtype=np.float32) / (2 * quarter)))
    angles = np.concatenate(
        [rows[:, None].astype(np.float32) * inv_freq, cols[:, None].astype(np.float32) * inv_freq], axis=-1
    ).astype(np.float32)
    angles = np.concatenate([angles, angles], axis=-1)
    # rotate_half(x)·sin == swap_halves(x)·(−sin | +sin)
    sin = np.sin(angles)
    sin[:, : head_dim // 2] *= -1
    return taps, weights, np.cos(angles), sin


def _check_grids(grid_thw, n_patches: int, patch_dim: int, cfg: VisionConfig) -> list[tuple[int, int, int]]:
    grids = [tuple(int(v) for v in g) for g in np.asarray(grid_thw).reshape(-1, 3)]
    m = cfg.spatial_merge_size
    for t, h, w in grids:
        if t < 1 or h < m or w < m or h % m or w % m:
            raise Qwen35Error(
                f"grid_thw: ({t}, {h}, {w}) needs t ≥ 1 and h, w positive multiples of the merge size {m}"
            )
    total = sum(t * h * w for t, h, w in grids)
    if n_patches != total:
        raise Qwen35Error(f"pixel_values: {n_patches} patches, but grid_thw {grids} describes {total}")
    expected = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size**2
    if patch_dim != expected:
        raise Qwen35Error(f"pixel_values: patches of {patch_dim} values, expected {expected} (C·T·P·P)")
    return grids


class PatchEmbed(nn.Module):
    """The Conv3d with stride = kernel, as the Linear it equals on flattened (C, T, P, P) patches."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.proj = nn.Linear(cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size**2, cfg.hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        return self.proj(x)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.n_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def _rotate(self, x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
        half = self.head_dim // 2
        xf = x.astype(mx.float32)
        swapped = mx.concatenate([xf[..., half:], xf[..., :half]], axis=-1)
        return (xf * cos + swapped * sin).astype(x.dtype)

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array, runs: Sequence[tuple[int, int]]) -> mx.array:
        """``runs``: consecutive (frame count, frame length) groups covering the sequence."""
        N = x.shape[0]
        qkv = self.qkv(x).reshape(N, 3, self.n_heads, self.head_dim)
        q = self._rotate(qkv[:, 0], cos, sin)
        k = self._rotate(qkv[:, 1], cos, sin)
        v = qkv[:, 2]
        outs, start = [], 0
        for count, length in runs:
            # Equal-length frames batch into one call; attention stays inside each.
            end = start + count * length
            q_, k_, v_ = (
                a[start:end].reshape(count, length, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)
                for a in (q, k, v)
            )
            o = mx.fast.scaled_dot_product_attention(q_, k_, v_, scale=self.head_dim**-0.5)
            outs.append(o.transpose(0, 2, 1, 3).reshape(end - start, -1))
            start = end
        out = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=0)
        return self.proj(out)


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.linear_fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.linear_fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_fc2(nn.gelu_approx(self.linear_fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=LN_EPS)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=LN_EPS)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)

    def __call__(self, x, cos, sin, runs):
        x = x + self.attn(self.norm1(x), cos, sin, runs)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.merged = cfg.hidden_size * cfg.spatial_merge_size**2
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=LN_EPS)
        self.linear_fc1 = nn.Linear(self.merged, self.merged)
        self.linear_fc2 = nn.Linear(self.merged, cfg.out_hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.norm(x).reshape(-1, self.merged)
        return self.linear_fc2(nn.gelu(self.linear_fc1(x)))


class VisionModel(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.side = round(cfg.num_position_embeddings**0.5)
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.hidden_size)
        self.blocks = [VisionBlock(cfg) for _ in range(cfg.depth)]
        self.merger = PatchMerger(cfg)

    @property
    def dtype(self) -> mx.Dtype:
        """The activations' dtype (LayerNorms are never quantized, so their weight tells it)."""
        return self.merger.norm.weight.dtype

    def _positions(self, grids):
        """Resampled position embeddings [N, hidden] (float32) and rotary cos/sin [N, 1, head_dim]."""
        m, hd = self.cfg.spatial_merge_size, self.cfg.head_dim
        tables = [_frame_tables(h, w, m, self.side, hd) for _, h, w in grids]

        def tiled(i):
            parts = [np.tile(tab[i], (t, 1)) for (t, _, _), tab in zip(grids, tables)]
            return mx.array(np.concatenate(parts) if len(parts) > 1 else parts[0])

        taps, weights, cos, sin = (tiled(i) for i in range(4))
        cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
        rows = self.pos_embed(taps).astype(mx.float32)  # [N, 4, hidden]
        pos = (rows * weights[..., None]).sum(axis=1)
        return pos, cos, sin

    def __call__(self, pixel_values: mx.array, grid_thw) -> mx.array:
        """Merged features [Σ t·h·w / merge², out_hidden_size] for patches [Σ t·h·w, C·T·P·P]."""
        if pixel_values.ndim != 2:
            raise Qwen35Error(f"pixel_values: expected [patches, C·T·P·P], got shape {tuple(pixel_values.shape)}")
        grids = _check_grids(grid_thw, pixel_values.shape[0], pixel_values.shape[1], self.cfg)
        runs: list[tuple[int, int]] = []
        for t, h, w in grids:
            for _ in range(t):
                if runs and runs[-1][1] == h * w:
                    runs[-1] = (runs[-1][0] + 1, h * w)
                else:
                    runs.append((1, h * w))
        pos, cos, sin = self._positions(grids)
        x = self.patch_embed(pixel_values.astype(self.dtype))
        x = x + pos.astype(x.dtype)
        for block in self.blocks:
            x = block(x, cos, sin, runs)
        return self.merger(x)
