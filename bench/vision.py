"""Vision-encode time: our tower against mlx-vlm's Qwen3.5 tower, same weights, one run.

Random weights at the real 2B vision shape (24 blocks, width 1024, 16 heads,
MLP 4096, output 2048), float32. Each image is preprocessed once by our
processor; the time is the tower alone, from patches to merged tokens, the
median of a few interleaved runs after a warm-up. On Linux run with OpenBLAS preloaded:

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 python bench/vision.py
    ... --sizes 448          # only the small image
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from PIL import Image

from mlx_qwen35.config import VisionConfig
from mlx_qwen35.model.vision import VisionModel
from mlx_qwen35.processor import process_images

# NOTES.md §1 / tensor_shapes.json: Qwen3.5-2B's vision_config.
SHAPE = VisionConfig(
    depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2048, num_position_embeddings=2304
)


def towers():
    """Our tower with random weights, and mlx-vlm's loaded with the very same tensors."""
    from mlx_vlm.models.qwen3_5.config import VisionConfig as VlmConfig
    from mlx_vlm.models.qwen3_5.vision import VisionModel as VlmVision

    mx.random.seed(0)
    ours = VisionModel(SHAPE)  # MLX's default random initialisation
    theirs = VlmVision(
        VlmConfig(
            model_type="qwen3_5",
            depth=SHAPE.depth,
            hidden_size=SHAPE.hidden_size,
            intermediate_size=SHAPE.intermediate_size,
            num_heads=SHAPE.num_heads,
            out_hidden_size=SHAPE.out_hidden_size,
            num_position_embeddings=SHAPE.num_position_embeddings,
            patch_size=SHAPE.patch_size,
            spatial_merge_size=SHAPE.spatial_merge_size,
            temporal_patch_size=SHAPE.temporal_patch_size,
        )
    )
    weights = []
    for name, w in tree_flatten(ours.parameters()):
        if name == "patch_embed.proj.weight":  # ours [O, C·T·P·P] → mlx-vlm's Conv3d [O, T, P, P, C]
            p, t = SHAPE.patch_size, SHAPE.temporal_patch_size
            w = w.reshape(-1, SHAPE.in_channels, t, p, p).transpose(0, 2, 3, 4, 1)
        weights.append((name, w))
    theirs.load_weights(weights, strict=True)
    mx.eval(ours.parameters(), theirs.parameters())
    return ours, theirs


def timed(fns, repeats: int):
    """Median seconds of each function (runs interleaved, so load drifts hit all alike), and first outputs."""
    times, outputs = [[] for _ in fns], []
    for r in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            out = fn()
            mx.eval(out)
            times[i].append(time.perf_counter() - t0)
            if r == 0:
                outputs.append(out)
    return [statistics.median(t) for t in times], outputs


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[448, 1344], help="square image sides")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per tower and size")
    args = parser.parse_args()

    ours, theirs = towers()
    rng = np.random.default_rng(0)

    def encode(side):
        img = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
        pv, grid = process_images([img])
        pixels, grid_mx = mx.array(pv), mx.array(grid)
        return pv.shape[0], [lambda: ours(pixels, grid), lambda: theirs(pixels, grid_mx)[0]]

    timed(encode(64)[1], 1)  # warm-up: allocator, kernels
    print(f"vision tower, Qwen3.5-2B shape, float32, {mx.default_device()}, median of {args.repeats}")
    print(f"{'image':>11} {'patches':>8} {'tokens':>7} {'ours s':>8} {'mlx-vlm s':>10} {'ratio':>6} {'max |Δ|':>9}")
    for side in args.sizes:
        patches, fns = encode(side)
        (t_ours, t_theirs), (a, b) = timed(fns, args.repeats)
        print(
            f"{side:>5}×{side:<5} {patches:>8} {a.shape[0]:>7} {t_ours:>8.3f} {t_theirs:>10.3f} "
            f"{t_theirs / t_ours:>5.2f}× {float(mx.abs(a - b).max()):>9.2e}",
            flush=True,
        )
    print("ratio = mlx-vlm time / our time (above 1: ours is faster)")


if __name__ == "__main__":
    main()
