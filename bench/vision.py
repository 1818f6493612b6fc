"""Vision-encode time: our tower against mlx-vlm's Qwen3.5 tower, same weights, one run.

Random weights at the real 2B vision shape (24 blocks, width 1024, 16 heads,
MLP 4096, output 2048), float32. Each image is preprocessed once by our
processor; the time is the tower alone, from patches to merged tokens, the
best of a few interleaved runs after a warm-up on a small image (which also
checks that both towers agree). On Linux the script re-runs itself on
OpenBLAS when it is installed (see the README):

    python bench/vision.py
    ... --sizes 448 --rounds 3      # the 1344×1344 encode takes many minutes on a 2-core CPU
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import race, use_fast_blas  # noqa: E402

from mlx_qwen35.config import VisionConfig  # noqa: E402
from mlx_qwen35.model.vision import VisionModel  # noqa: E402
from mlx_qwen35.processor import process_images  # noqa: E402

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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[448, 1344], help="square image sides")
    parser.add_argument("--rounds", type=int, default=3, help="timed runs per tower and size (best is kept)")
    args = parser.parse_args()
    blas = use_fast_blas()

    ours, theirs = towers()
    rng = np.random.default_rng(0)

    def encoders(side: int):
        img = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
        pv, grid = process_images([img])
        pixels, grid_mx = mx.array(pv), mx.array(grid)
        fns = {"ours": lambda: ours(pixels, grid), "mlx-vlm": lambda: theirs(pixels, grid_mx)[0]}
        return pv.shape[0], fns

    _, small = encoders(64)
    diff = float(mx.abs(small["ours"]() - small["mlx-vlm"]()).max())
    print(f"mlx {mx.__version__}, device {mx.default_device()}, BLAS: {blas}")
    print(f"vision tower at the Qwen3.5-2B shape, float32, random weights; outputs agree to max |Δ| {diff:.1e}")
    print(f"{'image':>11} {'patches':>8} {'tokens':>7} {'ours s':>9} {'mlx-vlm s':>10} {'ratio':>7}")
    for side in args.sizes:
        patches, fns = encoders(side)
        best = race(fns, rounds=args.rounds, warmups=small)
        print(
            f"{side:>5}×{side:<5} {patches:>8} {patches // 4:>7} {best['ours']:>9.3f} {best['mlx-vlm']:>10.3f} "
            f"{best['mlx-vlm'] / best['ours']:>6.2f}×",
            flush=True,
        )
    print("ratio = mlx-vlm time / our time (above 1: ours is faster)")


if __name__ == "__main__":
    main()
