"""Typed configuration parsed from a Hugging Face ``config.json``.

Two layouts exist: the multimodal ``qwen3_5`` one (``text_config`` and
``vision_config`` nested, token ids at the top) and the flat text-only
``qwen3_5_text`` one. Every dense Qwen3.5 size (0.8B … 9B) is described by
the same fields; nothing here is specific to 2B.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

from .errors import Qwen35Error

MODEL_TYPES = ("qwen3_5", "qwen3_5_text")
LAYER_TYPES = ("linear_attention", "full_attention")

_MISSING = object()


def _get(d: dict, key: str, where: str, default: Any = _MISSING) -> Any:
    if key in d and d[key] is not None:
        return d[key]
    if default is _MISSING:
        raise Qwen35Error(f"config: missing required field '{where}{key}'")
    return default


def _typed(value: Any, kind: type, name: str) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise Qwen35Error(
            f"config: field '{name}' must be {kind.__name__}, got {value!r}"
        )
    return value


@dataclass(frozen=True)
class TextConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    vocab_size: int
    layer_types: tuple[str, ...]
    # gated full attention
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    # Gated DeltaNet
    linear_num_key_heads: int
    linear_num_value_heads: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_conv_kernel_dim: int
    # positions
    rope_theta: float
    partial_rotary_factor: float
    mrope_section: tuple[int, int, int]
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    mtp_num_hidden_layers: int = 0
    eos_token_id: Optional[int] = None

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def linear_key_dim(self) -> int:
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def linear_value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def conv_dim(self) -> int:
        return 2 * self.linear_key_dim + self.linear_value_dim


@dataclass(frozen=True)
class VisionConfig:
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    num_position_embeddings: int
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    text: TextConfig
    vision: Optional[VisionConfig]
    image_token_id: int = 248056
    video_token_id: int = 248057
    vision_start_token_id: int = 248053
    vision_end_token_id: int = 248054
    # mlx-lm style: {"group_size", "bits", "mode", "<module path>": False | {...}}
    quantization: Optional[dict] = None
    raw: dict = field(default_factory=dict, compare=False, repr=False)
    # the checkpoint folder it was read from, whose processor configs images are preprocessed by
    folder: Optional[Path] = field(default=None, compare=False, repr=False)


def _parse_text(d: dict, where: str) -> TextConfig:
    def req(key, kind):
        return _typed(_get(d, key, where), kind, where + key)

    def opt(key, kind, default):
        return _typed(_get(d, key, where, default), kind, where + key)

    hidden = req("hidden_size", int)
    n_layers = req("num_hidden_layers", int)
    n_heads = req("num_attention_heads", int)
    n_kv = opt("num_key_value_heads", int, n_heads)
    head_dim = opt("head_dim", int, hidden // n_heads)

    layer_types = d.get("layer_types")
    if layer_types is None:
        interval = opt("full_attention_interval", int, 4)
        layer_types = [
            "full_attention" if (i + 1) % interval == 0 else "linear_attention"
            for i in range(n_layers)
        ]
    layer_types = tuple(layer_types)
    if len(layer_types) != n_layers:
        raise Qwen35Error(
            f"config: '{where}layer_types' has {len(layer_types)} entries but "
            f"'{where}num_hidden_layers' is {n_layers}"
        )
    for t in layer_types:
        if t not in LAYER_TYPES:
            raise Qwen35Error(
                f"config: '{where}layer_types' contains {t!r}; expected one of {LAYER_TYPES}"
            )

    # transformers 5 writes rope_parameters; older files put the same keys at
    # the top level or under rope_scaling.
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "mrope"):
        raise Qwen35Error(
            f"config: '{where}rope_parameters.rope_type' is {rope_type!r}; "
            "only 'default' (the released models' setting) is supported"
        )
    theta = _typed(rope.get("rope_theta", d.get("rope_theta", 10_000_000)), float, where + "rope_theta")
    prf = _typed(
        rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 0.25)),
        float,
        where + "partial_rotary_factor",
    )
    section = tuple(rope.get("mrope_section", (11, 11, 10)))
    if rope.get("mrope_interleaved", True) is not True:
        raise Qwen35Error(
            f"config: '{where}rope_parameters.mrope_interleaved' must be true for Qwen3.5"
        )

    cfg = TextConfig(
        hidden_size=hidden,
        intermediate_size=req("intermediate_size", int),
        num_hidden_layers=n_layers,
        vocab_size=req("vocab_size", int),
        layer_types=layer_types,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        head_dim=head_dim,
        linear_num_key_heads=req("linear_num_key_heads", int),
        linear_num_value_heads=req("linear_num_value_heads", int),
        linear_key_head_dim=req("linear_key_head_dim", int),
        linear_value_head_dim=req("linear_value_head_dim", int),
        linear_conv_kernel_dim=opt("linear_conv_kernel_dim", int, 4),
        rope_theta=theta,
        partial_rotary_factor=prf,
        mrope_section=section,
        max_position_embeddings=opt("max_position_embeddings", int, 262144),
        rms_norm_eps=opt("rms_norm_eps", float, 1e-6),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
        mtp_num_hidden_layers=opt("mtp_num_hidden_layers", int, 0),
        eos_token_id=d.get("eos_token_id"),
    )

    def check(ok: bool, msg: str):
        if not ok:
            raise Qwen35Error(f"config: {msg}")

    check(
        n_heads % n_kv == 0,
        f"'{where}num_attention_heads' ({n_heads}) must be a multiple of "
        f"'{where}num_key_value_heads' ({n_kv})",
    )
    check(
        cfg.linear_num_value_heads % cfg.linear_num_key_heads == 0,
        f"'{where}linear_num_value_heads' ({cfg.linear_num_value_heads}) must be a "
        f"multiple of '{where}linear_num_key_heads' ({cfg.linear_num_key_heads})",
    )
    check(
        len(section) == 3 and sum(section) * 2 == cfg.rotary_dim,
        f"'{where}rope_parameters.mrope_section' {list(section)} must have 3 entries "
        f"summing to half the rotary dim ({cfg.rotary_dim} = head_dim {head_dim} × "
        f"partial_rotary_factor {prf})",
    )
    check(
        cfg.rotary_dim % 2 == 0 and 0 < cfg.rotary_dim <= head_dim,
        f"'{where}partial_rotary_factor' {prf} gives an invalid rotary dim for head_dim {head_dim}",
    )
    return cfg


def _parse_vision(d: dict) -> VisionConfig:
    w = "vision_config."

    def req(key, kind):
        return _typed(_get(d, key, w), kind, w + key)

    def opt(key, kind, default):
        return _typed(_get(d, key, w, default), kind, w + key)

    cfg = VisionConfig(
        depth=req("depth", int),
        hidden_size=req("hidden_size", int),
        intermediate_size=req("intermediate_size", int),
        num_heads=req("num_heads", int),
        out_hidden_size=req("out_hidden_size", int),
        num_position_embeddings=req("num_position_embeddings", int),
        patch_size=opt("patch_size", int, 16),
        temporal_patch_size=opt("temporal_patch_size", int, 2),
        spatial_merge_size=opt("spatial_merge_size", int, 2),
        in_channels=opt("in_channels", int, 3),
    )
    side = round(cfg.num_position_embeddings**0.5)
    if side * side != cfg.num_position_embeddings:
        raise Qwen35Error(
            f"config: '{w}num_position_embeddings' ({cfg.num_position_embeddings}) must be a square"
        )
    if cfg.hidden_size % cfg.num_heads:
        raise Qwen35Error(
            f"config: '{w}hidden_size' ({cfg.hidden_size}) must be a multiple of '{w}num_heads' ({cfg.num_heads})"
        )
    return cfg


def parse_config(d: dict, source: str = "config.json") -> ModelConfig:
    """Turn a config dict into a :class:`ModelConfig`, or raise naming the field."""
    try:
        model_type = d.get("model_type")
        if model_type not in MODEL_TYPES:
            raise Qwen35Error(
                f"config: 'model_type' is {model_type!r}; expected one of {MODEL_TYPES} "
                "(a Qwen3.5 dense checkpoint)"
            )
        if model_type == "qwen3_5":
            tc = d.get("text_config")
            if not isinstance(tc, dict):
                raise Qwen35Error("config: missing required field 'text_config'")
            text = _parse_text(tc, "text_config.")
            top_tie = d.get("tie_word_embeddings")
            if top_tie is not None and "tie_word_embeddings" in tc and bool(top_tie) != text.tie_word_embeddings:
                raise Qwen35Error(
                    "config: 'tie_word_embeddings' and 'text_config.tie_word_embeddings' disagree"
                )
            if top_tie is not None:
                text = replace(text, tie_word_embeddings=bool(top_tie))
            vc = d.get("vision_config")
            vision = _parse_vision(vc) if isinstance(vc, dict) else None
            if vision is not None and vision.out_hidden_size != text.hidden_size:
                raise Qwen35Error(
                    f"config: 'vision_config.out_hidden_size' ({vision.out_hidden_size}) must equal "
                    f"'text_config.hidden_size' ({text.hidden_size})"
                )
        else:
            text = _parse_text(d, "")
            vision = None
        # the vision token ids, defaulting to the released checkpoints' (ModelConfig's defaults)
        ids = {
            k: _typed(d.get(k, getattr(ModelConfig, k)), int, k)
            for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
        }
        quant = d.get("quantization")
        if quant is not None and not isinstance(quant, dict):
            raise Qwen35Error("config: 'quantization' must be an object")
        return ModelConfig(
            model_type=model_type, text=text, vision=vision, quantization=quant, raw=d, **ids
        )
    except Qwen35Error as e:
        raise Qwen35Error(f"{source}: {e}") from None


def read_json_object(path: Path) -> dict:
    """A JSON object from ``path``, or a Qwen35Error naming the file."""
    try:
        d = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Qwen35Error(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise Qwen35Error(f"{path}: expected a JSON object")
    return d


def load_config(folder: Path) -> ModelConfig:
    """Read and parse ``folder/config.json``."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise Qwen35Error(f"{path}: not found (a Qwen3.5 checkpoint folder has a config.json)")
    return replace(parse_config(read_json_object(path), str(path)), folder=Path(folder))
