"""Images and videos in a prompt: their placeholders, features and 3-axis positions.

The chat template writes one ``<|image_pad|>`` (or ``<|video_pad|>``) per item;
:func:`prompt_inputs` expands each into its merged tokens, scatters the vision
features into their places and computes the mRoPE positions and the delta
decoding continues from. Each item is encoded once: a chat keeps its features
for later turns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import mlx.core as mx
import numpy as np

from .errors import Qwen35Error
from .model.positions import mrope_positions
from .processor import IMAGE_SETTINGS, VIDEO_SETTINGS, expand_vision_tokens, load_settings, process_images
from .video import process_video


@dataclass
class Media:
    """One image or video: its patches until encoded, then its features."""

    kind: Literal["image", "video"]
    grid: np.ndarray  # [1, 3] (t, h, w) in patches
    pixel_values: Optional[np.ndarray] = None
    timestamps: Optional[list[float]] = None  # video: seconds per temporal group
    features: Optional[mx.array] = None

    def encode(self, model) -> mx.array:
        if self.features is None:
            self.features = model.encode_vision(self.pixel_values, self.grid)
            mx.eval(self.features)
            self.pixel_values = None
        return self.features


def load_media(model, images: Sequence = (), videos: Sequence = ()) -> list[Media]:
    """Read and preprocess images (paths or PIL images) and videos (see ``video.load_video``).

    All files are checked before anything is encoded, so bad input fails early.
    """
    if not (images or videos):
        return []
    if not hasattr(model, "visual"):
        raise Qwen35Error("images: this model has no vision tower (a text-only checkpoint)")
    folder = model.config.folder
    image_settings, video_settings = load_settings(folder) if folder else (IMAGE_SETTINGS, VIDEO_SETTINGS)
    v = model.config.vision
    tower = (v.patch_size, v.temporal_patch_size, v.spatial_merge_size)
    for name, s in (("preprocessor_config.json", image_settings), ("video_preprocessor_config.json", video_settings)):
        if (s.patch_size, s.temporal_patch_size, s.merge_size) != tower:
            raise Qwen35Error(
                f"{name}: patch, temporal patch and merge sizes "
                f"{(s.patch_size, s.temporal_patch_size, s.merge_size)} do not match the vision tower's {tower}"
            )
    out = []
    for image in images:
        pixels, grid = process_images([image], image_settings)
        out.append(Media("image", grid, pixels))
    for video in videos:
        pixels, grid, stamps = process_video(video, video_settings)
        out.append(Media("video", grid, pixels, stamps))
    return out


def user_content(text: str, media: Sequence[Media]) -> object:
    """A user message's content: the media placeholders (images, then videos), then the text."""
    if not media:
        return text
    return [{"type": m.kind} for m in media] + [{"type": "text", "text": text}]


@dataclass
class PromptInputs:
    ids: list[int]
    embeddings: Optional[mx.array] = None  # [1, T, hidden]; None for text only
    positions: Optional[mx.array] = None  # [3, 1, T]
    rope_delta: int = 0


def prompt_inputs(model, tokenizer, ids: list[int], media: Sequence[Media]) -> PromptInputs:
    """Model inputs for rendered prompt ``ids`` whose placeholders stand for ``media``, in order."""
    config = model.config
    if not media:
        if config.image_token_id in ids or config.video_token_id in ids:
            raise Qwen35Error("prompt: it has image or video placeholders but no images or videos were given")
        return PromptInputs(list(ids))
    images = [m for m in media if m.kind == "image"]
    videos = [m for m in media if m.kind == "video"]
    grids = lambda items: np.concatenate([m.grid for m in items]) if items else None
    ids = expand_vision_tokens(
        ids,
        grids(images),
        grids(videos),
        config,
        video_timestamps=[m.timestamps for m in videos],
        encode=lambda s: tokenizer.encode(s, add_special_tokens=False),
    )
    positions, delta = mrope_positions(ids, grids(images), grids(videos), config)
    features = lambda items: mx.concatenate([m.encode(model) for m in items]) if items else None
    embeddings = model.embed_with_features(ids, features(images), features(videos))
    return PromptInputs(ids, embeddings, positions, delta)

