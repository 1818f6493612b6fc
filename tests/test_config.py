"""Config parsing: every dense Qwen3.5 size from its config alone; clear errors otherwise."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
from mlx.utils import tree_flatten

from mlx_qwen35.config import load_config, parse_config
from mlx_qwen35.errors import Qwen35Error
from mlx_qwen35.model import Model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from shapes import CONFIGS, QWEN3_5_2B  # noqa: E402
from reference import REFERENCE as REF, requires_reference as needs_ref  # noqa: E402


def ref_config(name="config.json") -> dict:
    return json.loads((REF / name).read_text())


def sized(base: dict, **text) -> dict:
    d = copy.deepcopy(base)
    d["text_config"].update(text)
    if "hidden_size" in text:
        d["vision_config"]["out_hidden_size"] = text["hidden_size"]
    return d


@needs_ref
def test_real_2b_config():
    cfg = load_config(REF)
    t = cfg.text
    assert (t.hidden_size, t.num_hidden_layers, t.vocab_size) == (2048, 24, 248320)
    assert [i for i, k in enumerate(t.layer_types) if k == "full_attention"] == [3, 7, 11, 15, 19, 23]
    assert (t.head_dim, t.rotary_dim, t.mrope_section, t.rope_theta) == (256, 64, (11, 11, 10), 1e7)
    assert (t.linear_num_key_heads, t.linear_num_value_heads, t.conv_dim) == (16, 16, 6144)
    assert t.tie_word_embeddings and t.mtp_num_hidden_layers == 1
    assert cfg.vision.depth == 24 and cfg.vision.head_dim == 64
    assert (cfg.vision_start_token_id, cfg.vision_end_token_id, cfg.image_token_id) == (248053, 248054, 248056)


@needs_ref
def test_bench_shapes_are_the_official_configs():
    assert CONFIGS == {"qwen3_5_2b": ref_config(), "qwen3_5_0_8b": ref_config("config_qwen3_5_0_8b.json")}


def param_shapes(cfg_dict) -> dict:
    model = Model(parse_config(cfg_dict), mtp=True)  # parameters stay lazy: nothing is allocated
    return {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}


@needs_ref
def test_2b_builds_the_published_tensor_shapes():
    shapes = json.loads((REF / "tensor_shapes.json").read_text())
    published = {**shapes["language_model"], **shapes["vision"], **shapes["mtp"]}
    assert len(published) == 632
    ours = param_shapes(ref_config())
    assert len(ours) == 632
    for hf_name, shape in published.items():
        name = hf_name.removeprefix("model.")
        if name == "visual.patch_embed.proj.weight":
            shape = [shape[0], shape[1] * shape[2] * shape[3] * shape[4]]
        if name.endswith("conv1d.weight"):
            shape = [shape[0], shape[2], shape[1]]
        assert ours[name] == tuple(shape), name


def test_every_released_size_builds_from_its_config():
    base = QWEN3_5_2B
    s = param_shapes(CONFIGS["qwen3_5_0_8b"])
    assert s["language_model.layers.0.linear_attn.in_proj_qkv.weight"] == (6144, 1024)
    assert s["visual.blocks.11.attn.qkv.weight"] == (3 * 768, 768)
    # 4B and 9B: 32 value heads over 16 key heads, wider attention
    for hidden, inter in ((2560, 9216), (4096, 12288)):
        s = param_shapes(
            sized(
                base,
                hidden_size=hidden,
                intermediate_size=inter,
                num_hidden_layers=32,
                num_attention_heads=16,
                num_key_value_heads=4,
                linear_num_value_heads=32,
                layer_types=(["linear_attention"] * 3 + ["full_attention"]) * 8,
            )
        )
        assert s["language_model.layers.0.linear_attn.in_proj_qkv.weight"] == (2 * 16 * 128 + 32 * 128, hidden)
        assert s["language_model.layers.0.linear_attn.in_proj_a.weight"] == (32, hidden)
        assert s["language_model.layers.31.self_attn.q_proj.weight"] == (16 * 256 * 2, hidden)


def test_flat_text_config():
    d = {
        "model_type": "qwen3_5_text",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "linear_key_head_dim": 32,
        "linear_value_head_dim": 48,
        "vocab_size": 512,
        "full_attention_interval": 2,
        "rope_parameters": {"mrope_section": [2, 1, 1], "rope_theta": 1e4, "partial_rotary_factor": 0.25},
    }
    cfg = parse_config(d)
    assert cfg.vision is None
    assert cfg.text.layer_types == ("linear_attention", "full_attention") * 2
    assert cfg.text.conv_dim == 2 * 64 + 4 * 48


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update(model_type="llama"), "'model_type' is 'llama'"),
        (lambda d: d.pop("text_config"), "missing required field 'text_config'"),
        (lambda d: d["text_config"].pop("hidden_size"), "missing required field 'text_config.hidden_size'"),
        (lambda d: d["text_config"].update(hidden_size="big"), "'text_config.hidden_size' must be int"),
        (
            lambda d: d["text_config"].update(num_hidden_layers=23),
            "'text_config.layer_types' has 24 entries but 'text_config.num_hidden_layers' is 23",
        ),
        (
            lambda d: d["text_config"].update(linear_num_value_heads=24),
            "'text_config.linear_num_value_heads' (24) must be a multiple of 'text_config.linear_num_key_heads' (16)",
        ),
        (
            lambda d: d["text_config"].update(num_key_value_heads=3),
            "'text_config.num_attention_heads' (8) must be a multiple of 'text_config.num_key_value_heads' (3)",
        ),
        (
            lambda d: d["text_config"]["rope_parameters"].update(mrope_section=[11, 11, 11]),
            "mrope_section' [11, 11, 11] must have 3 entries summing to half the rotary dim (64",
        ),
        (
            lambda d: d["text_config"]["rope_parameters"].update(rope_type="yarn"),
            "rope_type' is 'yarn'",
        ),
        (
            lambda d: d["vision_config"].update(out_hidden_size=1024),
            "'vision_config.out_hidden_size' (1024) must equal 'text_config.hidden_size' (2048)",
        ),
        (lambda d: d["vision_config"].pop("depth"), "missing required field 'vision_config.depth'"),
        (lambda d: d.update(tie_word_embeddings=False), "'tie_word_embeddings' and 'text_config.tie_word_embeddings' disagree"),
    ],
)
def test_bad_config_names_the_field(tmp_path, edit, message):
    d = copy.deepcopy(QWEN3_5_2B)
    d["text_config"]["tie_word_embeddings"] = True
    edit(d)
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(Qwen35Error) as e:
        load_config(tmp_path)
    assert str(tmp_path / "config.json") in str(e.value)
    assert message in str(e.value)


def test_unreadable_config(tmp_path):
    with pytest.raises(Qwen35Error, match="config.json: not found"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(Qwen35Error, match="config.json: not valid JSON"):
        load_config(tmp_path)
