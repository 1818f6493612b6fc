"""Videos to vision-tower patches: frames read, sampled at the processor's rate, resized as one and patched.

A video is an animated image or a folder or list of frames; frames fill the
temporal slots of a patch in pairs, and each pair gets the timestamp the
official processor writes before it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageSequence

from .errors import Qwen35Error
from .processor import (
    VIDEO_SETTINGS,
    VisionSettings,
    load_image,
    normalized,
    open_image,
    patchify,
    prepare_image,
    smart_resize,
)

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def _gif_frames(path: Path, img: Image.Image) -> tuple[list[Image.Image], float]:
    frames, total_ms = [], 0
    try:
        for frame in ImageSequence.Iterator(img):
            # Browsers show frames of ≤ 10 ms for 100 ms; so do we.
            ms = frame.info.get("duration") or 0
            total_ms += ms if ms > 10 else 100
            frames.append(prepare_image(frame.copy(), f"{path} frame {len(frames)}"))
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise Qwen35Error(f"{path}: truncated or corrupt animation ({e})") from None
    return frames, 1000.0 * len(frames) / total_ms


def load_video(source, frame_rate: Optional[float] = None) -> tuple[list[Image.Image], float]:
    """Frames and their rate from an animated image, a folder of frames (sorted by name) or a list.

    An animation's rate comes from its frame durations; a folder or list is
    taken to be sampled at ``frame_rate`` (default: the processor's fps, so
    every frame is kept). All frames must have one size.
    """
    if frame_rate is not None and not frame_rate > 0:
        raise Qwen35Error(f"video: frame rate must be positive, got {frame_rate}")
    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        if path.is_dir():
            items = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
            if not items:
                raise Qwen35Error(f"{path}: a folder with no image frames ({', '.join(FRAME_SUFFIXES)})")
        else:
            img = open_image(path)
            if getattr(img, "n_frames", 1) < 2:
                raise Qwen35Error(f"{path}: a still image; a video is an animation or a folder of frames")
            frames, rate = _gif_frames(path, img)
            return frames, frame_rate or rate
    elif isinstance(source, Sequence) and not isinstance(source, (str, bytes)):
        items = list(source)
    else:
        raise Qwen35Error(f"video: expected a path or a list of frames, got {type(source).__name__}")
    frames = [load_image(f) for f in items]
    for i, (item, f) in enumerate(zip(items, frames)):
        if f.size != frames[0].size:
            name = item if isinstance(item, (str, Path)) else f"video frame {i}"
            raise Qwen35Error(
                f"{name}: {f.width}×{f.height}, but the video's first frame is {frames[0].width}×{frames[0].height}"
            )
    return frames, frame_rate or VIDEO_SETTINGS.fps


def sample_frame_indices(total: int, frame_rate: float, s: VisionSettings) -> np.ndarray:
    """Which of ``total`` frames to keep: ``s.fps`` per second, within [min_frames, max_frames]."""
    n = int(total / frame_rate * s.fps)
    n = min(max(n, s.min_frames), s.max_frames, total)
    return np.linspace(0, total - 1, n).round().astype(int)


def frame_timestamps(indices: np.ndarray, frame_rate: float, temporal_patch_size: int) -> list[float]:
    """Seconds for each temporal group: the mean time of its first and last frame."""
    idx = list(indices)
    idx += [idx[-1]] * (-len(idx) % temporal_patch_size)
    t = [i / frame_rate for i in idx]
    return [(t[i] + t[i + temporal_patch_size - 1]) / 2 for i in range(0, len(t), temporal_patch_size)]


def video_frame_size(num_frames: int, height: int, width: int, s: VisionSettings) -> tuple[int, int]:
    """The resized (height, width) of ``num_frames`` sampled frames: the budget covers them all."""
    if height < s.factor or width < s.factor:
        # Frames thinner than one merged patch are first scaled up to it.
        scale = max(s.factor / height, s.factor / width)
        height, width = int(height * scale), int(width * scale)
    return smart_resize(height, width, s.factor, s.min_pixels, s.max_pixels, num_frames, s.temporal_patch_size)


def process_video(
    source, settings: VisionSettings = VIDEO_SETTINGS, frame_rate: Optional[float] = None
) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """``pixel_values_videos`` [t·h·w, C·T·P·P], ``video_grid_thw`` [1, 3] and one timestamp per temporal group.

    ``source`` is anything :func:`load_video` takes.
    """
    frames, rate = load_video(source, frame_rate)
    indices = sample_frame_indices(len(frames), rate, settings)
    T = settings.temporal_patch_size
    if len(indices) < T:
        raise Qwen35Error(f"video: {len(frames)} frame(s); a video needs at least {T}")
    frames = [frames[i] for i in indices]
    width, height = frames[0].size
    h, w = video_frame_size(len(frames), height, width, settings)
    stack = np.stack([normalized(f, h, w, settings) for f in frames])
    if pad := -len(stack) % T:
        stack = np.concatenate([stack, np.repeat(stack[-1:], pad, axis=0)])
    grid = np.array([[len(stack) // T, h // settings.patch_size, w // settings.patch_size]], dtype=np.int64)
    return patchify(stack, settings), grid, frame_timestamps(indices, rate, T)
