"""Three-axis (time, height, width) mRoPE positions for prompts with images and video.

Text advances all three axes together, one per token. The merged tokens of an
image share the time position where the image starts and spread over height
and width by their row and column; the next token then starts
``max(rows, cols)`` later. A video is a sequence of such frames (each temporal
group of two frames is one), since timestamps separate them in the prompt.
This is transformers' ``get_rope_index`` for Qwen3.5.
"""

from __future__ import annotations

from typing import Iterator

import mlx.core as mx
import numpy as np

from ..config import ModelConfig
from ..errors import Qwen35Error


def _frames(grid_thw, split_time: bool) -> list[tuple[int, int, int]]:
    grids = [] if grid_thw is None else [tuple(int(v) for v in g) for g in np.asarray(grid_thw).reshape(-1, 3)]
    if split_time:
        return [(1, h, w) for t, h, w in grids for _ in range(t)]
    return grids


def mrope_positions(
    input_ids,
    image_grid_thw,
    video_grid_thw,
    config: ModelConfig,
    *,
    offset: int = 0,
    rope_delta: int = 0,
) -> tuple[mx.array, int]:
    """Positions [3, B, T] (int32) for already-expanded ``input_ids`` [B, T], and the new rope delta.

    Each run of ``<|image_pad|>`` / ``<|video_pad|>`` tokens takes the next
    image grid (or video frame) in order; a run must hold exactly that grid's
    merged token count. ``offset`` is the cache index of the first token and
    ``rope_delta`` the delta of what precedes it (a later chat turn continues
    from both); the returned delta is what decoding adds to the cache index.
    """
    if config.vision is None:
        raise Qwen35Error("mrope_positions: needs the config of a checkpoint with a vision tower")
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2:
        raise Qwen35Error(f"input_ids: expected [batch, tokens], got shape {ids.shape}")
    m = config.vision.spatial_merge_size
    pads = {config.image_token_id: "image", config.video_token_id: "video"}
    sources: dict[str, Iterator] = {
        "image": iter(_frames(image_grid_thw, split_time=False)),
        "video": iter(_frames(video_grid_thw, split_time=True)),
    }
    B, T = ids.shape
    out = np.empty((3, B, T), dtype=np.int64)
    deltas = []
    for b in range(B):
        row, pos = ids[b], out[:, b]
        is_pad = np.isin(row, list(pads))
        cur = offset + rope_delta
        i = 0
        while i < T:
            rest = np.flatnonzero(is_pad[i:])
            j = i + int(rest[0]) if rest.size else T
            pos[:, i:j] = cur + np.arange(j - i)
            cur += j - i
            i = j
            if i == T:
                break
            kind = pads[int(row[i])]
            grid = next(sources[kind], None)
            if grid is None:
                raise Qwen35Error(
                    f"input_ids: more <|{kind}_pad|> runs than {kind} grids given "
                    f"(the run at token {i} has no {kind})"
                )
            t, gh, gw = grid[0], grid[1] // m, grid[2] // m
            n = t * gh * gw
            if i + n > T or not np.all(row[i : i + n] == row[i]):
                have = int(np.argmin(np.append(row[i:] == row[i], False)))
                raise Qwen35Error(
                    f"input_ids: the <|{kind}_pad|> run at token {i} has {have} tokens; its grid "
                    f"{grid} needs {n} (expand each placeholder before computing positions)"
                )
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
            pos[0, i : i + n] = cur + tt.reshape(-1)
            pos[1, i : i + n] = cur + hh.reshape(-1)
            pos[2, i : i + n] = cur + ww.reshape(-1)
            cur += max(gh, gw)
            i += n
        deltas.append(cur - (offset + T))
    for kind, left in sources.items():
        n_left = sum(1 for _ in left)
        if n_left:
            raise Qwen35Error(f"input_ids: {n_left} {kind} grid(s) left without <|{kind}_pad|> tokens")
    if len(set(deltas)) > 1:
        raise Qwen35Error(
            f"input_ids: batch rows have different rope deltas {deltas}; decode rows with "
            "different image layouts separately"
        )
    return mx.array(out.astype(np.int32)), int(deltas[0])
