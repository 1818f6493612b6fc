"""Shared fixtures: tiny random checkpoints, built once per test session."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from checkpoints import TEXT, TEXT_GQA, VISION, build_hf_checkpoint, write_tiny_tokenizer  # noqa: E402
from reference import REFERENCE  # noqa: E402

pytest_plugins = ["tokenizer_fixture", "serving"]


def pytest_configure(config):
    config.addinivalue_line("markers", "reference: compares with the official files of the reference folder")


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason=f"{REFERENCE} is absent (the official files this test compares with)")
    for item in items:
        if "official_tokenizer" in getattr(item, "fixturenames", ()):
            item.add_marker("reference")
        if not REFERENCE.is_dir() and item.get_closest_marker("reference"):
            item.add_marker(skip)


def rel_err(ours, ref) -> float:
    """‖ours − ref‖ / ‖ref‖ over all elements (Frobenius)."""
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def spy(monkeypatch, owner, name) -> list:
    """Record the calls of owner.name (still running it)."""
    calls, fn = [], getattr(owner, name)

    def wrapper(*args, **kwargs):
        calls.append(args)
        return fn(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return calls


class HFCheckpoint:
    def __init__(self, path: Path, model):
        self.path = path
        self.model = model  # transformers, float32, same weights as written

    def logits(self, ids: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.model(input_ids=torch.tensor(ids)).logits.numpy()


def _build(factory, name, **kw) -> HFCheckpoint:
    path = factory.mktemp(name)
    model = build_hf_checkpoint(path, **kw)
    write_tiny_tokenizer(path)
    return HFCheckpoint(path, model)


@pytest.fixture(scope="session")
def hf_text(tmp_path_factory) -> HFCheckpoint:
    """Text-only (flat qwen3_5_text), Hv = Hk, float32."""
    return _build(tmp_path_factory, "hf_text", text=TEXT, vision=None)


@pytest.fixture(scope="session")
def hf_gqa(tmp_path_factory) -> HFCheckpoint:
    """Text-only, Hv = 2·Hk and Dk != Dv, float32."""
    return _build(tmp_path_factory, "hf_gqa", text=TEXT_GQA, vision=None)


@pytest.fixture(scope="session")
def hf_bf16(tmp_path_factory) -> HFCheckpoint:
    """Multimodal layout with vision and MTP, stored in bfloat16 like the real checkpoints."""
    return _build(tmp_path_factory, "hf_bf16", text=TEXT, vision=VISION, dtype="bfloat16")


@pytest.fixture(scope="session")
def hf_vl(tmp_path_factory) -> HFCheckpoint:
    """Multimodal layout (text + vision + MTP), float32."""
    return _build(tmp_path_factory, "hf_vl", text=TEXT_GQA, vision=VISION)


@pytest.fixture(scope="session")
def hf_calm(tmp_path_factory) -> HFCheckpoint:
    """Text-only with transformers' own initialisation, for quantization error."""
    return _build(tmp_path_factory, "hf_calm", text=TEXT, vision=None, hf_init=True)


@pytest.fixture
def token_ids() -> np.ndarray:
    return np.random.default_rng(0).integers(0, TEXT["vocab_size"], (2, 29))


@pytest.fixture(scope="session")
def chat_hf(tmp_path_factory, qwen35_tokenizer_dir) -> HFCheckpoint:
    """A tiny random model with the real vocabulary, tokenizer and chat template, and its transformers twin."""
    import shutil

    path = tmp_path_factory.mktemp("chat_model")
    model = build_hf_checkpoint(path, text=dict(TEXT, vocab_size=248320), vision=VISION, with_mtp=False)
    for f in qwen35_tokenizer_dir.iterdir():
        if f.name != "config.json":
            shutil.copyfile(f, path / f.name)
    return HFCheckpoint(path, model)


@pytest.fixture(scope="session")
def chat_model_dir(chat_hf) -> Path:
    return chat_hf.path


@pytest.fixture(scope="session")
def chat_model(chat_model_dir):
    """(model, tokenizer) of :func:`chat_model_dir`, float32."""
    from mlx_qwen35.loading import load

    return load(chat_model_dir)
