"""Tiny random Qwen3.5 checkpoints built with transformers, the reference.

Norm weights, decays and biases are randomised (HF initialises the
zero-centred norms to 0, which would hide a missing +1 shift).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    linear_num_key_heads=2,
    linear_num_value_heads=2,
    linear_key_head_dim=32,
    linear_value_head_dim=32,
    linear_conv_kernel_dim=4,
    vocab_size=512,
    max_position_embeddings=4096,
    layer_types=["linear_attention"] * 3 + ["full_attention"],
    rope_parameters=dict(
        mrope_interleaved=True,
        mrope_section=[2, 1, 1],
        rope_type="default",
        rope_theta=10000.0,
        partial_rotary_factor=0.25,
    ),
    mtp_num_hidden_layers=1,
    tie_word_embeddings=True,
)

# Hv = 2·Hk and Dk != Dv
TEXT_GQA = dict(TEXT, linear_num_value_heads=4, linear_value_head_dim=48)

VISION = dict(
    depth=2,
    hidden_size=64,
    intermediate_size=128,
    num_heads=2,
    out_hidden_size=64,
    num_position_embeddings=64,
    patch_size=16,
    spatial_merge_size=2,
    temporal_patch_size=2,
)


def hf_model(text: dict = TEXT, vision: dict | None = VISION):
    """Qwen3_5ForConditionalGeneration, or the text-only Qwen3_5ForCausalLM when ``vision`` is None."""
    from transformers import (
        Qwen3_5Config,
        Qwen3_5ForCausalLM,
        Qwen3_5ForConditionalGeneration,
        Qwen3_5TextConfig,
    )

    if vision is None:
        return Qwen3_5ForCausalLM(Qwen3_5TextConfig(**text))
    cfg = Qwen3_5Config(
        text_config=dict(text),
        vision_config=dict(vision),
        tie_word_embeddings=text.get("tie_word_embeddings", True),
    )
    return Qwen3_5ForConditionalGeneration(cfg)


def randomize(model, seed: int = 0) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.rand(p.shape, generator=g) * 2.0 - 1.0)
            elif name.endswith("dt_bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif "norm" in name and p.ndim == 1:
                base = 1.0 if ("linear_attn.norm" in name or "visual" in name) else 0.0
                p.copy_(base + torch.randn(p.shape, generator=g) * 0.2)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.08)


def mtp_tensors(text: dict, seed: int = 1) -> dict[str, np.ndarray]:
    """HF-named MTP weights (transformers does not build the MTP head)."""
    rng = np.random.default_rng(seed)
    h, hd = text["hidden_size"], text["head_dim"]
    nh, nkv, inter = text["num_attention_heads"], text["num_key_value_heads"], text["intermediate_size"]
    shapes = {
        "mtp.fc.weight": (h, 2 * h),
        "mtp.pre_fc_norm_embedding.weight": (h,),
        "mtp.pre_fc_norm_hidden.weight": (h,),
        "mtp.norm.weight": (h,),
        "mtp.layers.0.input_layernorm.weight": (h,),
        "mtp.layers.0.post_attention_layernorm.weight": (h,),
        "mtp.layers.0.self_attn.q_proj.weight": (nh * hd * 2, h),
        "mtp.layers.0.self_attn.k_proj.weight": (nkv * hd, h),
        "mtp.layers.0.self_attn.v_proj.weight": (nkv * hd, h),
        "mtp.layers.0.self_attn.o_proj.weight": (h, nh * hd),
        "mtp.layers.0.self_attn.q_norm.weight": (hd,),
        "mtp.layers.0.self_attn.k_norm.weight": (hd,),
        "mtp.layers.0.mlp.gate_proj.weight": (inter, h),
        "mtp.layers.0.mlp.up_proj.weight": (inter, h),
        "mtp.layers.0.mlp.down_proj.weight": (h, inter),
    }
    return {k: (rng.standard_normal(s) * 0.08).astype(np.float32) for k, s in shapes.items()}


def build_hf_checkpoint(
    path: Path,
    *,
    text: dict = TEXT,
    vision: dict | None = VISION,
    dtype: str = "float32",
    seed: int = 0,
    with_mtp: bool = True,
    hf_init: bool = False,
):
    """Write a random checkpoint (see :func:`hf_model`) to ``path``.

    Returns the transformers model, in float32, holding exactly the weights
    written (bf16 weights are rounded first, so both sides see the same numbers).
    ``hf_init`` keeps transformers' own initialisation (small weights, norms
    at identity): a calmer network, for measuring quantization error.
    """
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = hf_model(text, vision).eval()
    if not hf_init:
        randomize(model, seed)
    tdtype = getattr(torch, dtype)

    def stored(name, t):
        # As in the real checkpoint, A_log and the gated norm stay float32.
        return t if name.endswith(("A_log", "linear_attn.norm.weight")) else t.to(tdtype)

    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(stored(name, p).to(torch.float32))
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # A copy of the weights is cast, not the model: casting the model would also
    # round its float32 buffers (the rotary inv_freq) and skew the reference.
    model.save_pretrained(path, state_dict={k: stored(k, v) for k, v in model.state_dict().items()})
    if with_mtp and text.get("mtp_num_hidden_layers", 0):
        add_mtp(path, text, seed + 1, dtype)
    return model


def add_mtp(path: Path, text: dict = TEXT, seed: int = 1, dtype: str = "float32") -> None:
    """Add a random MTP head (``mtp.safetensors``, in the index) to the checkpoint in ``path``."""
    import torch
    from safetensors.torch import save_file

    mtp = {k: torch.from_numpy(v).to(getattr(torch, dtype)).contiguous() for k, v in mtp_tensors(text, seed).items()}
    save_file(mtp, str(path / "mtp.safetensors"), metadata={"format": "pt"})
    index = path / "model.safetensors.index.json"
    if index.exists():
        idx = json.loads(index.read_text())
    else:
        from safetensors import safe_open

        with safe_open(str(path / "model.safetensors"), "pt") as f:
            idx = {"metadata": {}, "weight_map": {k: "model.safetensors" for k in f.keys()}}
    idx["weight_map"].update({k: "mtp.safetensors" for k in mtp})
    index.write_text(json.dumps(idx, indent=2))


def write_tiny_tokenizer(folder: Path) -> None:
    """A byte-level BPE over the 256 bytes plus the chat control tokens.

    Enough for tools that insist on a tokenizer (mlx-lm's converter); the real
    Qwen3.5 tokenizer is built in tokenizer_fixture.py.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    folder = Path(folder)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "model_max_length": 4096,
            }
        )
    )
