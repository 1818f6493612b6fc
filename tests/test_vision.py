"""The vision tower, multimodal embeddings and 3-axis positions against transformers.

A tiny random Qwen3.5 (tests/checkpoints.py TEXT + VISION) in float32; its
vision token ids are moved inside the 512-token vocabulary so transformers can
embed the prompt. Tolerances are relative Frobenius errors (conftest.rel_err).
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from checkpoints import TEXT, VISION, build_hf_checkpoint
from conftest import rel_err

from mlx_qwen35.errors import Qwen35Error
from mlx_qwen35.loading import load_model
from mlx_qwen35.model.positions import mrope_positions

TOL = 1e-4
IMG, VID, START, END = 500, 501, 502, 503
TOKEN_IDS = dict(image_token_id=IMG, video_token_id=VID, vision_start_token_id=START, vision_end_token_id=END)
PATCH_DIM = 3 * 2 * 16 * 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(transformers model, its folder) with in-vocabulary vision token ids."""
    path = tmp_path_factory.mktemp("tiny_vl")
    hf = build_hf_checkpoint(path, text=TEXT, vision=VISION, with_mtp=False)
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(TOKEN_IDS)
    (path / "config.json").write_text(json.dumps(cfg))
    for k, v in TOKEN_IDS.items():
        setattr(hf.config, k, v)
    return hf, path


@pytest.fixture(scope="module")
def ours(tiny):
    return load_model(tiny[1])


def pixels(grids, seed=0) -> np.ndarray:
    n = int(np.prod(np.asarray(grids), axis=-1).sum())
    return np.random.default_rng(seed).standard_normal((n, PATCH_DIM)).astype(np.float32)


def prompt(spec, seed=0) -> np.ndarray:
    """Token ids for ``spec``: an int is that many text tokens, ("image"|"video", (t, h, w)) a placeholder
    expanded as the official processor does (a video frame pair: 3 timestamp tokens, start, pads, end)."""
    rng = np.random.default_rng(seed)
    ids = []
    for item in spec:
        if isinstance(item, int):
            ids += rng.integers(0, IMG, item).tolist()
            continue
        kind, (t, h, w) = item
        ids.append(START)
        if kind == "image":
            ids += [IMG] * (h * w // 4)
        else:
            for _ in range(t):
                ids += rng.integers(0, IMG, 3).tolist() + [START] + [VID] * (h * w // 4) + [END]
        ids.append(END)
    return np.array(ids)


def token_types(ids: np.ndarray) -> np.ndarray:
    return (ids == IMG).astype(np.int64) + 2 * (ids == VID)


def hf_logits(hf, ids, image=None, video=None) -> np.ndarray:
    kw = dict(input_ids=torch.tensor(ids[None]), mm_token_type_ids=torch.tensor(token_types(ids)[None]))
    if image is not None:
        kw.update(pixel_values=torch.tensor(image[0]), image_grid_thw=torch.tensor(image[1]))
    if video is not None:
        kw.update(pixel_values_videos=torch.tensor(video[0]), video_grid_thw=torch.tensor(video[1]))
    with torch.no_grad():
        return hf(**kw, use_cache=False).logits[0].numpy()


def hf_rope_index(hf, ids, image_grid=None, video_grid=None):
    pos, delta = hf.model.get_rope_index(
        torch.tensor(ids[None]),
        mm_token_type_ids=torch.tensor(token_types(ids)[None]),
        image_grid_thw=None if image_grid is None else torch.tensor(image_grid),
        video_grid_thw=None if video_grid is None else torch.tensor(video_grid),
    )
    return pos.numpy(), int(delta[0, 0])


def our_forward(model, ids, image=None, video=None, cache=None, offset=0, rope_delta=0):
    """Logits [T, vocab] and the rope delta decoding continues with."""
    image = image or (None, None)
    video = video or (None, None)
    emb = model.embed_multimodal(ids[None], image[0], image[1], video[0], video[1])
    pos, delta = mrope_positions(ids[None], image[1], video[1], model.config, offset=offset, rope_delta=rope_delta)
    return np.array(model(None, cache=cache, input_embeddings=emb, positions=pos))[0], delta


GRID_SETS = {
    "one image": [[1, 16, 16]],
    "two sizes": [[1, 8, 12], [1, 6, 4]],
    "video": [[3, 6, 8]],
    "image and video frames": [[1, 4, 10], [2, 10, 4], [1, 10, 4]],
}


@pytest.mark.parametrize("name", GRID_SETS)
def test_tower_matches_transformers(tiny, ours, name):
    grids = np.array(GRID_SETS[name])
    pv = pixels(grids)
    with torch.no_grad():
        ref = tiny[0].model.visual(torch.tensor(pv), grid_thw=torch.tensor(grids)).pooler_output.numpy()
    out = np.array(ours.encode_vision(pv, grids))
    assert out.shape == (grids.prod(-1).sum() // 4, TEXT["hidden_size"])
    assert rel_err(out, ref) < TOL


def test_tower_in_bfloat16(tiny):
    # The real checkpoint runs the tower in bf16: a few bf16 roundings away from float32.
    model = load_model(tiny[1], dtype=mx.bfloat16)
    grids = np.array([[1, 16, 16]])
    pv = pixels(grids)
    with torch.no_grad():
        ref = tiny[0].model.visual(torch.tensor(pv), grid_thw=torch.tensor(grids)).pooler_output.numpy()
    out = model.encode_vision(pv, grids)
    assert out.dtype == mx.bfloat16
    assert rel_err(np.array(out.astype(mx.float32)), ref) < 3e-2


def test_logits_with_one_image(tiny, ours):
    grid = np.array([[1, 8, 12]])
    ids = prompt([5, ("image", grid[0]), 9])
    image = (pixels(grid), grid)
    logits, _ = our_forward(ours, ids, image)
    assert rel_err(logits, hf_logits(tiny[0], ids, image)) < TOL


def test_logits_with_two_images(tiny, ours):
    grid = np.array([[1, 8, 12], [1, 10, 6]])
    ids = prompt([4, ("image", grid[0]), 3, ("image", grid[1]), 7], seed=1)
    image = (pixels(grid, seed=1), grid)
    logits, _ = our_forward(ours, ids, image)
    assert rel_err(logits, hf_logits(tiny[0], ids, image)) < TOL


def test_logits_with_image_and_video(tiny, ours):
    igrid, vgrid = np.array([[1, 6, 6]]), np.array([[2, 4, 8]])
    ids = prompt([3, ("image", igrid[0]), 2, ("video", vgrid[0]), 5], seed=2)
    image, video = (pixels(igrid, 2), igrid), (pixels(vgrid, 3), vgrid)
    logits, _ = our_forward(ours, ids, image, video)
    assert rel_err(logits, hf_logits(tiny[0], ids, image, video)) < TOL


LAYOUTS = {
    "text only": ([7], None, None),
    "image first": ([("image", (1, 4, 6)), 5], [[1, 4, 6]], None),
    "tall image last": ([3, ("image", (1, 12, 4))], [[1, 12, 4]], None),
    "two images": ([2, ("image", (1, 6, 8)), 4, ("image", (1, 2, 2)), 3], [[1, 6, 8], [1, 2, 2]], None),
    "video": ([2, ("video", (3, 4, 6)), 2], None, [[3, 4, 6]]),
    "image then two videos": (
        [1, ("image", (1, 8, 4)), ("video", (2, 6, 6)), 2, ("video", (1, 4, 4)), 1],
        [[1, 8, 4]],
        [[2, 6, 6], [1, 4, 4]],
    ),
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_positions_equal_get_rope_index(tiny, ours, name):
    spec, igrid, vgrid = LAYOUTS[name]
    ids = prompt(spec)
    pos, delta = mrope_positions(ids, igrid, vgrid, ours.config)
    ref_pos, ref_delta = hf_rope_index(tiny[0], ids, igrid, vgrid)
    np.testing.assert_array_equal(np.array(pos), ref_pos)
    assert delta == ref_delta


def test_positions_of_a_later_turn_continue_the_first(tiny, ours):
    spec, igrid, vgrid = LAYOUTS["image then two videos"]
    ids = prompt(spec)
    ref_pos, ref_delta = hf_rope_index(tiny[0], ids, igrid, vgrid)
    split = 1 + 1 + 8 * 4 // 4 + 1  # text, start, image pads, end
    head, head_delta = mrope_positions(ids[:split], igrid, None, ours.config)
    tail, delta = mrope_positions(ids[split:], None, vgrid, ours.config, offset=split, rope_delta=head_delta)
    np.testing.assert_array_equal(np.concatenate([np.array(head), np.array(tail)], axis=-1), ref_pos)
    assert delta == ref_delta


@pytest.mark.parametrize("k", [1, 3])
def test_decoding_after_an_image_matches_full_forward(tiny, ours, k):
    grid = np.array([[1, 10, 8]])
    ids = prompt([6, ("image", grid[0]), 4 + k], seed=3)
    image = (pixels(grid, 4), grid)
    full = hf_logits(tiny[0], ids, image)
    cache = ours.make_cache()
    prefill, delta = our_forward(ours, ids[:-k], image, cache=cache)
    steps = [prefill]
    for t in range(len(ids) - k, len(ids)):
        steps.append(np.array(ours(mx.array(ids[None, t : t + 1]), cache=cache, rope_delta=delta))[0])
    assert rel_err(np.concatenate(steps), full) < TOL


def test_image_in_a_later_turn(tiny, ours):
    grid = np.array([[1, 6, 8], [1, 8, 4]])
    first = [5, ("image", grid[0]), 3]
    ids = prompt(first + [4, ("image", grid[1]), 6], seed=5)
    pv = pixels(grid, 5)
    split = len(prompt(first))
    n0 = int(grid[0].prod())
    full = hf_logits(tiny[0], ids, (pv, grid))

    cache = ours.make_cache()
    turn1, d1 = our_forward(ours, ids[:split], (pv[:n0], grid[:1]), cache=cache)
    turn2, d2 = our_forward(
        ours, ids[split:-2], (pv[n0:], grid[1:]), cache=cache, offset=split, rope_delta=d1
    )
    steps = [
        np.array(ours(mx.array(ids[None, t : t + 1]), cache=cache, rope_delta=d2))[0]
        for t in range(len(ids) - 2, len(ids))
    ]
    assert rel_err(np.concatenate([turn1, turn2] + steps), full) < TOL


def test_mlx_vlm_layout_maps_to_the_same_tower(tiny, ours):
    # mlx-vlm renames to vision_tower.* and stores the patch embed channels-last [O, T, P, P, C].
    from mlx.utils import tree_flatten
    from mlx_vlm.models.qwen3_5.vision import VisionModel as VlmVision

    from mlx_qwen35.model import Model

    hf_names = mx.load(str(tiny[1] / "model.safetensors"))
    vlm = VlmVision.sanitize(
        None, {k.replace("model.visual.", "vision_tower.", 1): v for k, v in hf_names.items() if "visual" in k}
    )
    assert vlm["vision_tower.patch_embed.proj.weight"].shape[-1] == 3
    mapped = dict(Model.sanitize(k, v, "mlx") for k, v in vlm.items())
    own = {k: v for k, v in tree_flatten(ours.parameters()) if k.startswith("visual.")}
    assert set(mapped) == set(own)
    for k, v in mapped.items():
        np.testing.assert_array_equal(np.array(v), np.array(own[k]))


def test_pad_count_must_match_features(ours):
    grid = np.array([[1, 4, 4]])
    ids = prompt([2, ("image", grid[0]), 2])
    with pytest.raises(Qwen35Error, match=r"4 <\|image_pad\|> tokens, but the images give 8"):
        ours.embed_multimodal(ids, pixels([[2, 4, 4]]), [[2, 4, 4]])
    with pytest.raises(Qwen35Error, match=r"no image was given"):
        ours.embed_multimodal(ids)
    with pytest.raises(Qwen35Error, match=r"run at token 3 has 4 tokens; its grid \(1, 6, 4\) needs 6"):
        mrope_positions(ids, [[1, 6, 4]], None, ours.config)
    with pytest.raises(Qwen35Error, match=r"1 image grid\(s\) left"):
        mrope_positions(ids, [[1, 4, 4], [1, 4, 4]], None, ours.config)
    with pytest.raises(Qwen35Error, match=r"patches, but grid_thw"):
        ours.encode_vision(pixels([[1, 4, 4]]), [[1, 4, 6]])
