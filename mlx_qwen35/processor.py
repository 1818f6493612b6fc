"""Images (and, through :mod:`.video`, video frames) to vision-tower patches, with numpy and Pillow only.

This reproduces the official Qwen3.5 preprocessing: ``smart_resize`` to a
multiple of patch × merge (32) within the checkpoint's pixel budget, bicubic
resampling, ``(x/255 − mean)/std``, and patches flattened (C, T, P, P) in
2×2 merge-block order. A still image fills both temporal slots of its patch;
video frames fill them in pairs. The prompt gets one pad token per merged
token (:func:`expand_vision_tokens`), and video frames get the timestamps
the official processor writes before each pair.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import ModelConfig, read_json_object
from .errors import Qwen35Error

ImageSource = Union[str, Path, Image.Image]

MAX_ASPECT_RATIO = 200
MIN_IMAGE_SIDE = 2  # a 1-pixel side has no shape to resample


@dataclass(frozen=True)
class VisionSettings:
    """One processor's settings; ``min_pixels``/``max_pixels`` bound the resized area."""

    min_pixels: int
    max_pixels: int
    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    resample: int = Image.Resampling.BICUBIC
    # video only
    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 768

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size


# The Qwen3.5 family's preprocessor_config.json / video_preprocessor_config.json.
IMAGE_SETTINGS = VisionSettings(min_pixels=65536, max_pixels=16777216)
VIDEO_SETTINGS = VisionSettings(min_pixels=4096, max_pixels=25165824)


def _read_settings(path: Path, default: VisionSettings) -> VisionSettings:
    if not path.is_file():
        return default
    d = read_json_object(path)
    size = d.get("size") or {}
    # Older files give the pixel budget as min_pixels / max_pixels.
    fields = {
        "min_pixels": size.get("shortest_edge", d.get("min_pixels")),
        "max_pixels": size.get("longest_edge", d.get("max_pixels")),
        **{k: d.get(k) for k in ("patch_size", "temporal_patch_size", "merge_size", "min_frames", "max_frames")},
        "fps": d.get("fps"),
        "rescale_factor": d.get("rescale_factor"),
        "resample": d.get("resample"),
        "image_mean": d.get("image_mean"),
        "image_std": d.get("image_std"),
    }
    if d.get("do_rescale") is False:
        fields["rescale_factor"] = 1.0
    if d.get("do_normalize") is False:
        fields["image_mean"], fields["image_std"] = (0.0,) * 3, (1.0,) * 3
    out = {}
    for name, value in fields.items():
        if value is None:
            continue
        ok = (
            isinstance(value, (list, tuple)) and len(value) == 3 and all(isinstance(v, (int, float)) for v in value)
            if name in ("image_mean", "image_std")
            else isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
        )
        if not ok:
            raise Qwen35Error(f"{path}: field '{name}' has an invalid value {value!r}")
        out[name] = tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else value
    s = replace(default, **out)
    if s.min_pixels > s.max_pixels:
        raise Qwen35Error(f"{path}: size.shortest_edge ({s.min_pixels}) exceeds size.longest_edge ({s.max_pixels})")
    return s


def load_settings(folder: Union[str, Path]) -> tuple[VisionSettings, VisionSettings]:
    """Image and video settings from a checkpoint folder; the official values where a file is absent."""
    folder = Path(folder)
    return (
        _read_settings(folder / "preprocessor_config.json", IMAGE_SETTINGS),
        _read_settings(folder / "video_preprocessor_config.json", VIDEO_SETTINGS),
    )


def smart_resize(
    height: int,
    width: int,
    factor: int,
    min_pixels: int,
    max_pixels: int,
    num_frames: int = 1,
    temporal_factor: int = 1,
) -> tuple[int, int]:
    """The (height, width), multiples of ``factor``, closest in shape to the input within the pixel budget.

    For video the budget covers all frames (rounded to ``temporal_factor``).
    """
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise Qwen35Error(
            f"{width}×{height} image: aspect ratio {max(height, width) / min(height, width):.1f} "
            f"exceeds the limit of {MAX_ASPECT_RATIO}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt(num_frames * height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB, with transparency composited on white (as the official processor does)."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # Pillow's own conversion clips 16-bit values at 255; scale them down instead.
        # (32-bit "I" images holding only 8-bit values are left as they are.)
        a = np.asarray(img).astype(np.float64)
        if img.mode != "I" or a.max() > 255:
            a = a / 257
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    if "A" in img.getbands() or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _check_size(img: Image.Image, name: str) -> None:
    w, h = img.size
    limit = Image.MAX_IMAGE_PIXELS
    if limit and w * h > limit:
        raise Qwen35Error(
            f"{name}: {w}×{h} = {w * h} pixels exceeds the limit of {limit} "
            "(PIL.Image.MAX_IMAGE_PIXELS, a guard against decompression bombs)"
        )
    if min(w, h) < MIN_IMAGE_SIDE:
        raise Qwen35Error(f"{name}: {w}×{h} image; each side must be at least {MIN_IMAGE_SIDE} pixels")
    if max(w, h) / min(w, h) > MAX_ASPECT_RATIO:
        raise Qwen35Error(
            f"{name}: {w}×{h} image has aspect ratio {max(w, h) / min(w, h):.1f}; "
            f"the limit is {MAX_ASPECT_RATIO}"
        )


def open_image(path: Path) -> Image.Image:
    """The image file at ``path``, opened but not decoded; a Qwen35Error naming it if it cannot be."""
    if not path.exists():
        raise Qwen35Error(f"{path}: no such file")
    if path.is_dir():
        raise Qwen35Error(f"{path}: a folder, not an image file")
    try:
        with warnings.catch_warnings():
            # Image.open warns above MAX_IMAGE_PIXELS; _check_size turns that into an error.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(path)
    except Image.DecompressionBombError as e:
        raise Qwen35Error(
            f"{path}: {e} (PIL.Image.MAX_IMAGE_PIXELS is {Image.MAX_IMAGE_PIXELS}; "
            "a guard against decompression bombs)"
        ) from None
    except UnidentifiedImageError:
        raise Qwen35Error(f"{path}: not an image file Pillow can read") from None
    except OSError as e:
        raise Qwen35Error(f"{path}: could not be read ({e})") from None


def prepare_image(img: Image.Image, name: str) -> Image.Image:
    """Checked, fully decoded, EXIF-oriented RGB."""
    _check_size(img, name)
    try:
        img.load()
        img = ImageOps.exif_transpose(img)
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise Qwen35Error(f"{name}: truncated or corrupt image data ({e})") from None
    return _to_rgb(img)


def load_image(source: ImageSource) -> Image.Image:
    """An RGB image from a path or a PIL image, upright per its EXIF orientation.

    Raises :class:`Qwen35Error` naming the file for anything that is not a
    readable image: unknown format, truncated data, more pixels than
    ``PIL.Image.MAX_IMAGE_PIXELS``, a side under 2 pixels, an aspect ratio over 200.
    """
    if isinstance(source, Image.Image):
        return prepare_image(source, getattr(source, "filename", "") or "image")
    if not isinstance(source, (str, Path)):
        raise Qwen35Error(f"image: expected a path or a PIL image, got {type(source).__name__}")
    path = Path(source).expanduser()
    return prepare_image(open_image(path), str(path))


def normalized(img: Image.Image, height: int, width: int, s: VisionSettings) -> np.ndarray:
    """Resized, rescaled and normalized [C, H, W] float32, with the official rounding."""
    a = np.asarray(img.resize((width, height), resample=s.resample))
    # Rescale in float64, round to float32, then normalize in float32 (the official
    # order), tabulated once for the 256 byte values of each channel.
    levels = (np.arange(256, dtype=np.float64) * s.rescale_factor).astype(np.float32)
    table = (levels[:, None] - np.asarray(s.image_mean, np.float32)) / np.asarray(s.image_std, np.float32)
    return table[a.transpose(2, 0, 1), np.arange(3)[:, None, None]]


def patchify(frames: np.ndarray, s: VisionSettings) -> np.ndarray:
    """[F, C, H, W] (F a multiple of the temporal patch) → [F/T·h·w, C·T·P·P] in merge-block order."""
    F, C, H, W = frames.shape
    T, P, m = s.temporal_patch_size, s.patch_size, s.merge_size
    gh, gw = H // P, W // P
    x = frames.reshape(F // T, T, C, gh // m, m, P, gw // m, m, P)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(F // T * gh * gw, C * T * P * P)


def process_images(
    images: Sequence[ImageSource], settings: VisionSettings = IMAGE_SETTINGS
) -> tuple[np.ndarray, np.ndarray]:
    """``pixel_values`` [Σ h·w, C·T·P·P] float32 and ``image_grid_thw`` [n, 3] int64."""
    if isinstance(images, (str, Path, Image.Image)):
        images = [images]
    patches, grids = [], []
    for source in images:
        img = load_image(source)
        h, w = smart_resize(img.height, img.width, settings.factor, settings.min_pixels, settings.max_pixels)
        frame = normalized(img, h, w, settings)
        frames = np.broadcast_to(frame, (settings.temporal_patch_size, *frame.shape))
        patches.append(patchify(frames, settings))
        grids.append((1, h // settings.patch_size, w // settings.patch_size))
    if not patches:
        raise Qwen35Error("images: none given")
    return np.concatenate(patches), np.array(grids, dtype=np.int64)


def timestamp_text(seconds: float) -> str:
    """The text the official processor puts before each temporal group of a video."""
    return f"<{seconds:.1f} seconds>"


def expand_vision_tokens(
    token_ids: Sequence[int],
    image_grid_thw,
    video_grid_thw,
    config: ModelConfig,
    *,
    video_timestamps: Optional[Sequence[Sequence[float]]] = None,
    encode: Optional[Callable[[str], list[int]]] = None,
) -> list[int]:
    """Replace each single ``<|image_pad|>`` / ``<|video_pad|>`` by its merged tokens.

    An image becomes h·w/4 pads. A video becomes, per temporal group, its
    timestamp text (tokenized with ``encode``), ``<|vision_start|>``, h·w/4
    pads and ``<|vision_end|>``, inside the placeholder's own start/end
    tokens, exactly as the official processor writes it.
    """
    if config.vision is None:
        raise Qwen35Error("images: this checkpoint has no vision tower")
    m2 = config.vision.spatial_merge_size**2
    ids = [int(t) for t in token_ids]
    grids = {
        "image": [] if image_grid_thw is None else np.asarray(image_grid_thw).reshape(-1, 3).tolist(),
        "video": [] if video_grid_thw is None else np.asarray(video_grid_thw).reshape(-1, 3).tolist(),
    }
    token = {"image": config.image_token_id, "video": config.video_token_id}
    for kind in ("image", "video"):
        n = ids.count(token[kind])
        if n != len(grids[kind]):
            hint = (
                f": the chat template wrote none, so it cannot place {kind}s; pass one that can with --chat-template"
                if n == 0
                else f"; each {kind} needs exactly one placeholder"
            )
            raise Qwen35Error(f"prompt: {n} <|{kind}_pad|> placeholder(s) but {len(grids[kind])} {kind}(s) given{hint}")
    if grids["video"]:
        if encode is None or video_timestamps is None or len(video_timestamps) != len(grids["video"]):
            raise Qwen35Error("videos: expanding a video needs `encode` and one timestamp list per video")
    out: list[int] = []
    n_image = n_video = 0
    for t in ids:
        if t == token["image"]:
            gt, gh, gw = grids["image"][n_image]
            out += [t] * (gt * gh * gw // m2)
            n_image += 1
        elif t == token["video"]:
            gt, gh, gw = grids["video"][n_video]
            stamps = video_timestamps[n_video]
            if len(stamps) != gt:
                raise Qwen35Error(f"videos: video {n_video} has {gt} temporal groups but {len(stamps)} timestamps")
            for seconds in stamps:
                out += encode(timestamp_text(seconds))
                out += [config.vision_start_token_id] + [t] * (gh * gw // m2) + [config.vision_end_token_id]
            n_video += 1
        else:
            out.append(t)
    return out
