"""Image and video preprocessing against transformers' Qwen3.5 processors.

Images: transformers' numpy/PIL ``Qwen2VLImageProcessorPil`` loaded from the
official preprocessor_config.json; outputs must be bit-identical. Video: the
official video processor resizes with torchvision, which does not import
beside this torch, so its reference is built from transformers' own pieces:
``Qwen3VLVideoProcessor.sample_frames`` / ``patchify``, the video
``smart_resize``, the PIL backend's resize / rescale / normalize and
``Qwen3VLProcessor``'s timestamps and prompt text.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.image_processing_backends import PilBackend
from transformers.image_transforms import convert_to_rgb
from transformers.image_utils import SizeDict
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as hf_video_smart_resize
from transformers.video_utils import VideoMetadata

from reference import REFERENCE, requires_reference

from mlx_qwen35.config import load_config
from mlx_qwen35.errors import Qwen35Error
from mlx_qwen35.processor import (
    IMAGE_SETTINGS,
    VIDEO_SETTINGS,
    expand_vision_tokens,
    load_image,
    load_settings,
    process_images,
    smart_resize,
)
from mlx_qwen35.video import process_video, video_frame_size


# The official preprocessor_config.json's values (a test compares them with the file when it is present).
OFFICIAL_IMAGE_PROCESSOR = {
    "size": {"longest_edge": 16777216, "shortest_edge": 65536},
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Qwen3VLProcessor",
    "image_processor_type": "Qwen2VLImageProcessorFast",
}


@pytest.fixture(scope="module")
def processor_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("processor")
    (folder / "preprocessor_config.json").write_text(json.dumps(OFFICIAL_IMAGE_PROCESSOR))
    return folder


@pytest.fixture(scope="module")
def hf_images(processor_folder):
    return Qwen2VLImageProcessorPil.from_pretrained(processor_folder)


def noise_image(h: int, w: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """Noise over a gradient: bicubic's every tap matters, and the image has a direction."""
    rng = np.random.default_rng(seed)
    c = len(mode)
    across = np.linspace(0, 100, w).astype(np.uint8)[None, :, None]
    down = np.linspace(0, 59, h).astype(np.uint8)[:, None, None]
    grad = across + down
    a = grad + rng.integers(0, 96, (h, w, c), dtype=np.uint8)  # ≤ 254: no wrap-around
    return Image.fromarray(a[..., 0] if c == 1 else a, mode)


# (height, width): below min_pixels, ordinary, odd, very tall, very wide, above max_pixels
SIZES = [(100, 80), (480, 640), (333, 517), (1000, 37), (29, 3000), (4200, 4100)]


@requires_reference
def test_settings_are_the_official_files():
    assert load_settings(REFERENCE) == (IMAGE_SETTINGS, VIDEO_SETTINGS)
    assert json.loads((REFERENCE / "preprocessor_config.json").read_text()) == OFFICIAL_IMAGE_PROCESSOR


def test_default_settings_are_those_of_the_official_values(processor_folder):
    assert load_settings(processor_folder)[0] == IMAGE_SETTINGS


@pytest.mark.parametrize("size", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_image_equals_transformers(hf_images, size):
    img = noise_image(*size, seed=size[0])
    ref = hf_images(img, return_tensors="np")
    pv, grid = process_images([img])
    np.testing.assert_array_equal(grid, ref["image_grid_thw"])
    assert pv.dtype == np.float32 and pv.shape == ref["pixel_values"].shape
    assert np.array_equal(pv, ref["pixel_values"])  # assert_array_equal takes seconds on 100M values


def test_several_images_equal_transformers(hf_images):
    imgs = [noise_image(300, 200, 1), noise_image(64, 640, 2), noise_image(512, 512, 3)]
    ref = hf_images(imgs, return_tensors="np")
    pv, grid = process_images(imgs)
    np.testing.assert_array_equal(grid, ref["image_grid_thw"])
    np.testing.assert_array_equal(pv, ref["pixel_values"])
    one, one_grid = process_images(imgs[0])  # a lone image needs no list
    np.testing.assert_array_equal(one_grid, ref["image_grid_thw"][:1])
    np.testing.assert_array_equal(one, ref["pixel_values"][: one.shape[0]])


def test_settings_from_a_checkpoint_folder(tmp_path):
    # Older files give the budget as min_pixels / max_pixels; transformers reads both spellings.
    (tmp_path / "preprocessor_config.json").write_text(
        '{"min_pixels": 4096, "max_pixels": 40000, "patch_size": 16, "merge_size": 2,'
        ' "image_mean": [0.48, 0.45, 0.4], "image_std": [0.26, 0.26, 0.27]}'
    )
    settings, video = load_settings(tmp_path)
    assert (settings.min_pixels, settings.max_pixels) == (4096, 40000)
    assert video == VIDEO_SETTINGS
    img = noise_image(700, 300, 4)
    ref = Qwen2VLImageProcessorPil.from_pretrained(tmp_path)(img, return_tensors="np")
    pv, grid = process_images([img], settings)
    np.testing.assert_array_equal(grid, ref["image_grid_thw"])
    np.testing.assert_array_equal(pv, ref["pixel_values"])

    (tmp_path / "preprocessor_config.json").write_text('{"size": {"shortest_edge": "big"}}')
    with pytest.raises(Qwen35Error, match=r"preprocessor_config.json: field 'min_pixels'"):
        load_settings(tmp_path)


def test_smart_resize_equals_transformers():
    rng = np.random.default_rng(0)
    sizes = rng.integers(2, 6000, (400, 2))
    sizes = [(h, w) for h, w in sizes if max(h, w) / min(h, w) <= 200]
    for h, w in sizes:
        assert smart_resize(h, w, 32, 65536, 16777216) == hf_smart_resize(h, w, 32, 65536, 16777216)
        for frames in (2, 5, 64):
            ours = video_frame_size(frames, h, w, VIDEO_SETTINGS)
            assert ours == hf_video_smart_resize(frames, h, w, 2, 32, 4096, 25165824)


MODES = ["RGBA", "LA", "L", "P", "P+transparency", "1", "CMYK"]


@pytest.mark.parametrize("mode", MODES)
def test_modes_convert_like_transformers(mode):
    img = noise_image(40, 56, 5, "RGBA" if mode == "RGBA" else "RGB")
    if mode == "LA":
        img = img.convert("LA")
    elif mode.startswith("P"):
        img = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
        if mode == "P+transparency":
            img.info["transparency"] = 3
    elif mode != "RGBA":
        img = img.convert(mode)
    np.testing.assert_array_equal(np.asarray(load_image(img)), convert_to_rgb(img, return_numpy=True))


def test_16_bit_is_scaled_not_clipped(tmp_path):
    grey = np.asarray(noise_image(30, 50, 6, "L"))
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "deep.png")), np.stack([grey] * 3, axis=-1))


def test_exif_orientation_is_applied(tmp_path):
    upright = noise_image(30, 50, 7)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "phone.png", exif=exif)
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "phone.png")), np.asarray(upright))


def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width × height, with no pixel data at all."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def bad_file(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.png"
    if kind == "text":
        path.write_text("not an image")
    elif kind == "truncated":
        noise_image(200, 200, 8).save(path)
        path.write_bytes(path.read_bytes()[:20000])
    elif kind == "bomb":
        png_header_only(path, 30000, 30000)  # Pillow itself refuses over twice the limit
    elif kind == "large":
        png_header_only(path, 10000, 10000)  # over the limit, under twice it: Pillow only warns
    elif kind == "tiny":
        Image.new("RGB", (1, 1)).save(path)
    elif kind == "thin":
        Image.new("RGB", (1005, 5)).save(path)
    return path


BAD = {
    "text": r"not an image file",
    "truncated": r"truncated or corrupt",
    "bomb": r"89478485",
    "large": r"100000000 pixels exceeds the limit of 89478485",
    "tiny": r"1×1 image; each side must be at least 2 pixels",
    "thin": r"aspect ratio 201.0; the limit is 200",
    "missing": r"no such file",
}


@pytest.mark.parametrize("kind", BAD)
def test_bad_images_name_the_file_and_the_limit(tmp_path, kind):
    path = bad_file(tmp_path, kind)
    with pytest.raises(Qwen35Error, match=BAD[kind]) as e:
        process_images([path])
    assert str(path) in str(e.value)


def reference_video(frames: list[Image.Image], frame_rate: float):
    """transformers' video pipeline, with PIL resizing in place of torchvision's."""
    hf_video = Qwen3VLVideoProcessor()
    hf_image = Qwen2VLImageProcessorPil()
    indices = hf_video.sample_frames(VideoMetadata(total_num_frames=len(frames), fps=frame_rate))
    chosen = [np.moveaxis(np.asarray(frames[i].convert("RGB")), -1, 0) for i in indices]
    h, w = hf_video_smart_resize(len(chosen), *chosen[0].shape[1:], 2, 32, 4096, 25165824)
    resized = [PilBackend.resize(hf_image, f, SizeDict(height=h, width=w), resample=3) for f in chosen]
    normed = [hf_image.normalize(hf_image.rescale(f, 1 / 255), [0.5] * 3, [0.5] * 3) for f in resized]
    patches, t, gh, gw = hf_video.patchify(torch.tensor(np.stack(normed))[None], 16, 2, 2)
    stamps = Qwen3VLProcessor._calculate_timestamps(None, indices, frame_rate, 2)
    return patches[0].numpy(), np.array([[t, gh, gw]]), stamps, indices


def check_video(ours, frames, frame_rate):
    ref_pv, ref_grid, ref_stamps, _ = reference_video(frames, frame_rate)
    pv, grid, stamps = ours
    np.testing.assert_array_equal(grid, ref_grid)
    np.testing.assert_array_equal(pv, ref_pv)
    assert stamps == pytest.approx(ref_stamps, abs=1e-12)


def test_video_from_a_list_of_frames():
    frames = [noise_image(90, 120, s) for s in range(9)]
    check_video(process_video(frames, frame_rate=6.0), frames, 6.0)  # 9 frames at 6 fps → 4 sampled


def test_video_from_an_animated_gif(tmp_path):
    frames = [noise_image(64, 96, s) for s in range(10)]
    frames[0].save(tmp_path / "clip.gif", save_all=True, append_images=frames[1:], duration=200, loop=0)
    decoded = []
    with Image.open(tmp_path / "clip.gif") as gif:
        for i in range(gif.n_frames):
            gif.seek(i)
            decoded.append(gif.convert("RGB"))
    check_video(process_video(tmp_path / "clip.gif"), decoded, 5.0)  # 200 ms a frame


def test_video_from_a_folder_of_small_frames(tmp_path):
    # 5 frames: an odd count pads the last pair; 20 px high is under one merged patch.
    frames = [noise_image(20, 50, s) for s in range(5)]
    for i, f in enumerate(frames):
        f.save(tmp_path / f"frame_{i:03d}.png")
    check_video(process_video(tmp_path), frames, VIDEO_SETTINGS.fps)


def test_bad_videos(tmp_path):
    noise_image(40, 40, 0).save(tmp_path / "still.png")
    with pytest.raises(Qwen35Error, match=r"still.png: a still image"):
        process_video(tmp_path / "still.png")
    with pytest.raises(Qwen35Error, match=r"1 frame\(s\); a video needs at least 2"):
        process_video([noise_image(40, 40, 0)])
    with pytest.raises(Qwen35Error, match=r"video frame 1: 40×30, but the video's first frame is 40×40"):
        process_video([noise_image(40, 40, 0), noise_image(30, 40, 1)])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(Qwen35Error, match=r"empty: a folder with no image frames"):
        process_video(empty)


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    """A Qwen3.5 vision-language config as transformers writes it (its token ids are the official ones)."""
    from checkpoints import hf_model

    folder = tmp_path_factory.mktemp("vl_config")
    hf_model().config.save_pretrained(folder)
    return load_config(folder)


SPECIAL = {"<|vision_start|>": 248053, "<|vision_end|>": 248054, "<|image_pad|>": 248056, "<|video_pad|>": 248057}


def toy_encode(text: str) -> list[int]:
    """Special tokens by id, every other character by its code point."""
    ids = []
    while text:
        special = next((s for s in SPECIAL if text.startswith(s)), None)
        ids.append(SPECIAL[special] if special else ord(text[0]))
        text = text[len(special) :] if special else text[1:]
    return ids


def test_expansion_is_the_official_prompt_text(config):
    image_grid = np.array([[1, 6, 8], [1, 4, 4]])
    frames = [noise_image(64, 64, s) for s in range(9)]
    _, video_grid, stamps, indices = reference_video(frames, 3.0)
    official = SimpleNamespace(
        image_processor=SimpleNamespace(merge_size=2),
        video_processor=SimpleNamespace(merge_size=2, temporal_patch_size=2),
        image_token="<|image_pad|>",
        video_token="<|video_pad|>",
        vision_start_token="<|vision_start|>",
        vision_end_token="<|vision_end|>",
        _calculate_timestamps=lambda *a: Qwen3VLProcessor._calculate_timestamps(None, *a),
    )
    images = {"image_grid_thw": torch.tensor(image_grid)}
    video = {"video_grid_thw": torch.tensor(video_grid), "video_metadata": [VideoMetadata(9, 3.0, frames_indices=indices)]}
    wrap = "<|vision_start|>{}<|vision_end|>"
    template = "Look: " + wrap + " and " + wrap + ", then " + wrap + "!"
    text = template.format(
        Qwen3VLProcessor.replace_image_token(official, images, 0),
        Qwen3VLProcessor.replace_image_token(official, images, 1),
        Qwen3VLProcessor.replace_video_token(official, video, 0),
    )
    placeholders = toy_encode(template.format("<|image_pad|>", "<|image_pad|>", "<|video_pad|>"))
    ours = expand_vision_tokens(
        placeholders, image_grid, video_grid, config, video_timestamps=[stamps], encode=toy_encode
    )
    assert ours == toy_encode(text)


def test_placeholders_must_match_the_images(config):
    ids = toy_encode("a <|vision_start|><|image_pad|><|vision_end|> b")
    with pytest.raises(Qwen35Error, match=r"1 <\|image_pad\|> placeholder\(s\) but 2 image\(s\) given"):
        expand_vision_tokens(ids, [[1, 4, 4], [1, 4, 4]], None, config)
    with pytest.raises(Qwen35Error, match=r"0 <\|video_pad\|> placeholder\(s\) but 1 video\(s\) given"):
        expand_vision_tokens(ids, [[1, 4, 4]], [[2, 4, 4]], config)
