"""The streaming reasoning/answer splitter.

Reference: a one-line regex split of the whole text by the documented
delimiters (``<think>`` + at most one newline; at most one newline +
``</think>`` + at most two newlines), written here independently of the
streaming code; and the official chat template for round trips.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import requires_reference

from mlx_qwen35.reasoning import ReasoningSplitter, split_reasoning, thinking_opened
from mlx_qwen35.tokenizer import render_prompt, render_text

DELIMITER = re.compile(r"(<think>\n?|\n?</think>\n{0,2})")
TAGS = ("<think>", "</think>")


def reference_segments(text: str, opened: bool) -> list[tuple[str, str]]:
    """(kind, text) segments of the whole text, adjacent equal kinds merged, empty ones dropped."""
    kind = "reasoning" if opened else "answer"
    segments = []
    for i, part in enumerate(DELIMITER.split(text)):
        if i % 2:
            kind = "answer" if "</think>" in part else "reasoning"
        else:
            segments.append((kind, part))
    return merged(segments)


def merged(pieces) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for kind, text in pieces:
        if not text:
            continue
        if out and out[-1][0] == kind:
            out[-1] = (kind, out[-1][1] + text)
        else:
            out.append((kind, text))
    return out


PARTIAL_DELIMITERS = [tag[:n] for tag in ("<think>", "</think>", "\n</think>") for n in range(1, len(tag))]


def partial_delimiter_tail(text: str) -> int:
    """Length of the longest end of ``text`` that could still grow into a delimiter."""
    return max((len(p) for p in PARTIAL_DELIMITERS if text.endswith(p)), default=0)


# Text made of the pieces that matter: tags, their fragments, newlines, and plain text.
ATOMS = st.sampled_from(
    ["<think>", "</think>", "<think", "</think", "</", "<", ">", "think", "\n", "\n\n", "\n\n\n", "a", " ", "é", "思考"]
)
TEXT = st.one_of(st.lists(ATOMS, max_size=30).map("".join), st.text(alphabet="<>/think\n a", max_size=40))


def cut(text: str, points: list[int]) -> list[str]:
    points = sorted({0, len(text), *points})
    return [text[a:b] for a, b in zip(points, points[1:])]


@settings(max_examples=400, deadline=None)
@given(text=TEXT, opened=st.booleans(), data=st.data())
def test_streaming_equals_whole_text_split_for_any_cut(text, opened, data):
    points = data.draw(st.lists(st.integers(0, len(text)), max_size=len(text) + 1))
    splitter = ReasoningSplitter(thinking_opened=opened)
    pieces = []
    fed = ""
    for chunk in cut(text, points):
        pieces += splitter.feed(chunk)
        fed += chunk
        # Everything is out except a tail that could still become a delimiter.
        emitted_upto = len(fed) - partial_delimiter_tail(fed)
        assert merged(pieces) == reference_segments(fed[:emitted_upto], opened)
    pieces += splitter.finish()

    assert merged(pieces) == reference_segments(text, opened)
    assert all(piece and not any(tag in piece for tag in TAGS) for _, piece in pieces)
    reasoning, answer = split_reasoning(text, thinking_opened=opened)
    assert reasoning == "".join(p for k, p in pieces if k == "reasoning")
    assert answer == "".join(p for k, p in pieces if k == "answer")


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=60), opened=st.booleans())
def test_text_without_tags_passes_through(text, opened):
    text = text.replace("<think>", "").replace("</think>", "")
    assert split_reasoning(text, thinking_opened=opened) == ((text, "") if opened else ("", text))


@pytest.mark.parametrize(
    "text, opened, expected",
    [
        ("R\n</think>\n\nA", True, ("R", "A")),
        ("<think>\nR\n</think>\n\nA", False, ("R", "A")),
        ("<think>\n\n</think>\n\nA", False, ("", "A")),
        # Only the newlines the template writes are delimiters; the rest is text.
        ("\nR\n\n</think>\n\n\nA\n", True, ("\nR\n", "\nA\n")),
        ("no close tag at all", True, ("no close tag at all", "")),
        ("no open tag at all", False, ("", "no open tag at all")),
        ("R</think>A", True, ("R", "A")),
        ("R </think", True, ("R </think", "")),
        ("x<think>y", False, ("y", "x")),
    ],
)
def test_examples(text, opened, expected):
    assert split_reasoning(text, thinking_opened=opened) == expected


def test_close_tag_split_across_pieces_holds_back_only_the_fragment():
    s = ReasoningSplitter(thinking_opened=True)
    assert s.feed("I think 1 < 2\n") == [("reasoning", "I think 1 < 2")]
    assert s.feed("</th") == []
    assert s.feed("ink>") == []
    assert s.kind == "answer"
    assert s.feed("\n") == []
    assert s.feed("\nThe answer") == [("answer", "The answer")]
    assert s.feed(" is <b>") == [("answer", " is <b>")]
    assert s.feed(" <") == [("answer", " ")]
    assert s.finish() == [("answer", "<")]


def test_thinking_opened_looks_at_the_generation_prompt_only():
    on = "<|im_start|>user\nsay </think><|im_end|>\n<|im_start|>assistant\n<think>\n"
    off = "<|im_start|>user\nsay <think><|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert thinking_opened(on)
    assert not thinking_opened(off)
    assert not thinking_opened("<|im_start|>user\n<think><|im_end|>\n<|im_start|>assistant\n")


def test_streaming_through_the_detokenizer(qwen35_tokenizer):
    """Pieces as mlx-lm's streaming detokenizer yields them, tags arriving as single tokens."""
    generated = "Ça va? 思考中…\n1 < 2 </thi\n</think>\n\n答案是 **42** 👍🏽"
    detok = qwen35_tokenizer.detokenizer
    splitter = ReasoningSplitter(thinking_opened=True)
    pieces = []
    for i in qwen35_tokenizer.encode(generated, add_special_tokens=False):
        detok.add_token(i)
        pieces += splitter.feed(detok.last_segment)
    detok.finalize()
    pieces += splitter.feed(detok.last_segment) + splitter.finish()
    assert merged(pieces) == [("reasoning", "Ça va? 思考中…\n1 < 2 </thi"), ("answer", "答案是 **42** 👍🏽")]


@pytest.mark.parametrize("thinking", [False, True])
@pytest.mark.parametrize("template", ["qwen35_tokenizer", pytest.param("official_tokenizer", marks=requires_reference)])
def test_round_trip_through_the_template(request, template, thinking):
    """A generated turn, split and put back as reasoning_content + content, renders exactly as generated."""
    qwen35_tokenizer = request.getfixturevalue(template)
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}]
    prompt = render_text(qwen35_tokenizer, history, enable_thinking=thinking)
    assert thinking_opened(prompt) == thinking
    generated = "Rayleigh scattering:\nshort waves scatter more.\n</think>\n\n" if thinking else ""
    generated += "Blue light scatters most.\n\nSo the sky looks blue."
    reasoning, answer = split_reasoning(generated, thinking_opened=thinking_opened(prompt))
    turn = {"role": "assistant", "reasoning_content": reasoning, "content": answer}
    rendered = render_text(qwen35_tokenizer, history + [turn], add_generation_prompt=False)
    assert rendered == prompt + generated + "<|im_end|>\n"
    assert render_prompt(qwen35_tokenizer, history + [turn], add_generation_prompt=False) == qwen35_tokenizer.encode(
        prompt + generated + "<|im_end|>\n", add_special_tokens=False
    )
