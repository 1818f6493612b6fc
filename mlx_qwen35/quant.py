"""Quantizing a model: the user's settings, applied through the model's policy, and reapplied on load.

Which layer gets how many bits is the model's to say (``Model.quant_predicate``);
here are the settings (``--q-bits``, ``--q-group-size``, ``--q-mode``), the
swap itself, and the ``quantization`` config entry that records it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import mlx.nn as nn

from .errors import Qwen35Error
from .precision import FLOAT_MODES, Q_MODES


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 4
    group_size: int = 64
    mode: str = "affine"
    vision: bool = False

    def __post_init__(self):
        if self.mode not in Q_MODES:
            raise Qwen35Error(f"--q-mode: {self.mode!r} is not one of {Q_MODES}")
        if self.mode == "affine":
            if self.bits not in (2, 3, 4, 5, 6, 8):
                raise Qwen35Error(f"--q-bits: {self.bits} is not one of 2, 3, 4, 5, 6, 8")
            if self.group_size not in (32, 64, 128):
                raise Qwen35Error(f"--q-group-size: {self.group_size} is not one of 32, 64, 128")

    def settings(self, bits: Optional[int] = None) -> dict:
        """to_quantized() arguments for the default rule, or for at least ``bits``."""
        if self.mode in FLOAT_MODES:
            mode = self.mode if bits is None or bits <= FLOAT_MODES[self.mode][0] else "mxfp8"
            b, gs = FLOAT_MODES[mode]
            return {"group_size": gs, "bits": b, "mode": mode}
        b = self.bits if bits is None else max(bits, self.bits)
        return {"group_size": self.group_size, "bits": b, "mode": "affine"}


def quantize(model, spec: QuantSpec) -> dict:
    """Quantize ``model`` in place by its policy; returns the ``quantization`` config entry."""
    decisions = {}

    def predicate(path, module):
        decisions[path] = model.quant_predicate(path, module, spec)
        return decisions[path]

    nn.quantize(model, class_predicate=predicate)
    default = spec.settings()
    entry = dict(default)
    for path, d in decisions.items():
        if d and d != default:
            entry[path] = d
    return entry


def apply_quantization(model: nn.Module, quant: dict, names) -> None:
    """Swap in quantized layers where the checkpoint holds ``.scales`` for them.

    ``quant`` is mlx-lm's config entry: defaults plus per-layer overrides
    (a dict of settings, or False for a layer left unquantized).
    """
    names = set(names)
    defaults = {
        "group_size": quant.get("group_size", 64),
        "bits": quant.get("bits", 4),
        "mode": quant.get("mode", "affine"),
    }

    def predicate(path, module):
        if f"{path}.scales" not in names:
            return False
        override = quant.get(path)
        if override is False:
            return False
        return {**defaults, **override} if isinstance(override, dict) else dict(defaults)

    nn.quantize(model, class_predicate=predicate)
