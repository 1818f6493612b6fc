"""Images and videos through the public API (generate, Chat), against transformers.

The tiny model has the real vocabulary and template, so prompts carry the real
vision token ids; transformers runs the same expanded ids and pixels.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import rel_err
from PIL import Image

from mlx_qwen35.chat import Chat
from mlx_qwen35.errors import Qwen35Error
from mlx_qwen35.generate import stream_generate
from mlx_qwen35.media import load_media, prompt_inputs, user_content
from mlx_qwen35.sampling import Sampling
from mlx_qwen35.tokenizer import render_prompt

GREEDY = Sampling(temperature=0.0)
TOL = 1e-4


def picture(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i, (w, h) in enumerate([(300, 200), (128, 256)]):
        paths.append(folder / f"img{i}.png")
        picture(w, h, i).save(paths[-1])
    frames = folder / "frames"
    frames.mkdir()
    for i in range(4):
        picture(96, 64, 10 + i).save(frames / f"{i:03d}.png")
    return paths, frames


def hf_inputs(model, tokenizer, messages, media, enable_thinking=False):
    """The expanded ids and transformers' keyword arguments for ``messages``."""
    ids = render_prompt(tokenizer, messages, enable_thinking=enable_thinking)
    inputs = prompt_inputs(model, tokenizer, ids, media)
    ids = np.array(inputs.ids)
    cfg = model.config
    kw = dict(
        input_ids=torch.tensor(ids[None]),
        mm_token_type_ids=torch.tensor(((ids == cfg.image_token_id) + 2 * (ids == cfg.video_token_id))[None]),
    )
    return ids, kw


def hf_last_logits(hf, kw, pixel_kw) -> np.ndarray:
    with torch.no_grad():
        return hf.model(**kw, **pixel_kw, use_cache=False).logits[0, -1].numpy()


def pixels(model, images=(), videos=()):
    media = load_media(model, images, videos)
    kw = {}
    imgs = [m for m in media if m.kind == "image"]
    vids = [m for m in media if m.kind == "video"]
    if imgs:
        kw["pixel_values"] = torch.tensor(np.concatenate([m.pixel_values for m in imgs]))
        kw["image_grid_thw"] = torch.tensor(np.concatenate([m.grid for m in imgs]))
    if vids:
        kw["pixel_values_videos"] = torch.tensor(np.concatenate([m.pixel_values for m in vids]))
        kw["video_grid_thw"] = torch.tensor(np.concatenate([m.grid for m in vids]))
    return media, kw


@pytest.mark.parametrize("which", ["one image", "two images", "image and video"])
def test_generate_with_media_matches_transformers(chat_model, chat_hf, images, which):
    model, tok = chat_model
    paths, frames = images
    imgs = {"one image": paths[:1], "two images": paths, "image and video": paths[:1]}[which]
    vids = [frames] if which == "image and video" else []
    gen = stream_generate(model, tok, "Describe what you see.", images=imgs, videos=vids, sampling=GREEDY, max_tokens=4)
    list(gen)
    media, pixel_kw = pixels(model, imgs, vids)
    messages = [{"role": "user", "content": user_content("Describe what you see.", media)}]
    ids, kw = hf_inputs(model, tok, messages, media)
    assert gen.result.prompt_tokens == len(ids)
    assert rel_err(np.array(gen.prompt_logits), hf_last_logits(chat_hf, kw, pixel_kw)) < TOL
    # greedy decoding continues at the right positions: transformers' argmax chain of full forwards
    chain = []
    for _ in range(len(gen.result.tokens)):
        full = dict(kw, input_ids=torch.tensor(np.concatenate([ids, chain])[None].astype(np.int64)))
        full["mm_token_type_ids"] = torch.nn.functional.pad(kw["mm_token_type_ids"], (0, len(chain)))
        chain.append(int(np.argmax(hf_last_logits(chat_hf, full, pixel_kw))))
    assert gen.result.tokens == chain


def test_chat_with_an_image_in_an_earlier_turn(chat_model, chat_hf, images, tmp_path):
    model, tok = chat_model
    paths, _ = images
    chat = Chat(model, tok, sampling=GREEDY, max_tokens=5)
    chat.ask("What is in this picture?", images=paths[:1])
    gen = chat.send("And the colours?")
    list(gen)
    media, pixel_kw = pixels(model, paths[:1])
    ids, kw = hf_inputs(model, tok, chat.messages[:-1], media)
    assert gen.result.prompt_tokens == len(ids)
    assert gen.result.prefilled_tokens < len(ids) // 2  # the image was not re-read
    assert rel_err(np.array(gen.prompt_logits), hf_last_logits(chat_hf, kw, pixel_kw)) < TOL

    # an image in a later turn, after a saved and resumed session
    chat.save(tmp_path / "s.session")
    resumed = Chat.load(tmp_path / "s.session", model, tok)
    a = chat.ask("Compare with this one.", images=paths[1:])
    b = resumed.ask("Compare with this one.", images=paths[1:])
    assert a.tokens == b.tokens and a.prefilled_tokens == b.prefilled_tokens
    media, pixel_kw = pixels(model, paths[:1] + paths[1:])
    ids, kw = hf_inputs(model, tok, chat.messages[:-1], media)
    assert a.prompt_tokens == len(ids)


def test_bad_media(chat_model, images, tmp_path):
    model, tok = chat_model
    paths, _ = images
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with pytest.raises(Qwen35Error, match="notes.txt"):
        stream_generate(model, tok, "Hi", images=[text])
    system_image = [
        {"role": "system", "content": [{"type": "image"}, {"type": "text", "text": "sys"}]},
        {"role": "user", "content": "Hi"},
    ]
    with pytest.raises(Qwen35Error, match="System message cannot contain images"):
        stream_generate(model, tok, system_image, images=paths[:1])
    one_placeholder = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    with pytest.raises(Qwen35Error, match="1 <\\|image_pad\\|> placeholder\\(s\\) but 2 image\\(s\\) given"):
        stream_generate(model, tok, one_placeholder, images=paths)
    with pytest.raises(Qwen35Error, match="no images or videos were given"):
        stream_generate(model, tok, one_placeholder)
    chat = Chat(model, tok, max_tokens=2)
    with pytest.raises(Qwen35Error, match="notes.txt"):
        chat.send("Look", images=[text])
    assert chat.messages == [] and chat.media == []  # nothing half-recorded


def test_processor_settings_must_fit_the_tower(chat_model, images, tmp_path, monkeypatch):
    import json
    import shutil

    model, _ = chat_model
    paths, _ = images
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "preprocessor_config.json").write_text(json.dumps({"patch_size": 14, "merge_size": 2}))
    monkeypatch.setattr(model, "config", replace(model.config, folder=folder))
    with pytest.raises(Qwen35Error, match=r"preprocessor_config.json: patch, temporal patch and merge sizes \(14, 2, 2\)"):
        load_media(model, paths[:1])
    shutil.rmtree(folder)
