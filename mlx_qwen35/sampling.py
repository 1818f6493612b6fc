"""Sampling settings and the model card's presets.

Plain data, with no MLX import: the command line lists the presets in its
``--help`` from here. :mod:`mlx_qwen35.sampler` turns settings into a sampler.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from .errors import Qwen35Error


@dataclass(frozen=True)
class Sampling:
    """Sampling settings; ``temperature`` 0 is greedy."""

    temperature: float = 1.0  # logits are divided by it
    top_p: float = 1.0  # the smallest set of likeliest tokens holding this much probability
    top_k: int = 20  # the k likeliest tokens; 0: all
    min_p: float = 0.0  # drops tokens below min_p × the top probability
    presence_penalty: float = 0.0  # subtracted from the logit of every token the answer holds already
    repetition_penalty: float = 1.0  # shrinks the logits of the last 20 tokens by this factor; 1: off

    def __post_init__(self):
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "repetition_penalty"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise Qwen35Error(f"{name}: must be a finite number, got {value!r}")
        checks = (
            ("temperature", self.temperature >= 0, "≥ 0"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("top_k", self.top_k >= 0, "≥ 0 (0 disables it)"),
            ("min_p", 0 <= self.min_p < 1, "in [0, 1)"),
            ("repetition_penalty", self.repetition_penalty > 0, "> 0"),
        )
        for name, ok, expected in checks:
            if not ok:
                raise Qwen35Error(f"{name}: must be {expected}, got {getattr(self, name)}")


# The Qwen3.5 small-model card's recommended settings (no generation_config.json ships).
PRESETS: dict[str, Sampling] = {
    "thinking": Sampling(temperature=1.0, top_p=0.95, top_k=20, presence_penalty=1.5),
    "thinking-coding": Sampling(temperature=0.6, top_p=0.95, top_k=20),
    "instruct": Sampling(temperature=1.0, top_p=1.0, top_k=20, presence_penalty=2.0),
    "instruct-vision": Sampling(temperature=0.7, top_p=0.8, top_k=20, presence_penalty=1.5),
}


def preset(name: str) -> Sampling:
    if name not in PRESETS:
        raise Qwen35Error(f"preset: {name!r} is not one of {', '.join(PRESETS)}")
    return PRESETS[name]


def default_sampling(think: bool) -> Sampling:
    return PRESETS["thinking" if think else "instruct"]
