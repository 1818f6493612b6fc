"""Tool calls: schemas, parsing per schema type, malformed calls, streaming, the test template, end to end."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
from forcing import forcing
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import requires_reference
from test_tokenizer import WEATHER_TOOL

from mlx_qwen35.errors import Qwen35Error
from mlx_qwen35.generate import generate, stream_generate
from mlx_qwen35.sampling import Sampling
from mlx_qwen35.stream import TextStream
from mlx_qwen35.tokenizer import SpecialTokens, render_text
from mlx_qwen35.tools import parse_call, tool_functions, tool_schemas

GREEDY = Sampling(temperature=0.0)

WEATHER = WEATHER_TOOL

EVERY_TYPE = {
    "type": "function",
    "function": {
        "name": "every",
        "parameters": {
            "type": "object",
            "properties": {
                "s": {"type": "string"},
                "i": {"type": "integer"},
                "n": {"type": "number"},
                "b": {"type": "boolean"},
                "z": {"type": "null"},
                "o": {"type": "object"},
                "a": {"type": "array"},
                "e": {"type": "string", "enum": ["low", "high"]},
                "opt": {"type": "integer", "nullable": True},
                "either": {"type": ["integer", "string"]},
                "any": {},
            },
            "required": ["s"],
        },
    },
}


def call_text(name: str, params: dict[str, str]) -> str:
    """A call in the template's format, written here by hand (values already as text)."""
    body = "".join(f"<parameter={p}>\n{v}\n</parameter>\n" for p, v in params.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


def inner(call: str) -> str:
    return call[len("<tool_call>") : -len("</tool_call>")]


# ---------------------------------------------------------------- schemas


def get_time(city: str, utc_offset: int = 0) -> str:
    """The time in a city.

    Args:
        city: Where.
        utc_offset: Hours from UTC.
    """
    return "noon"


def test_python_functions_become_openai_schemas():
    (schema,) = tool_schemas([get_time])
    assert schema == {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "The time in a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "Where."},
                    "utc_offset": {"type": "integer", "description": "Hours from UTC."},
                },
                "required": ["city"],
            },
        },
    }
    assert tool_schemas([WEATHER]) == [WEATHER] and tool_schemas(None) == []
    assert tool_functions([WEATHER, get_time]) == {"get_time": get_time}


def undocumented(x: int):
    pass


@pytest.mark.parametrize(
    "tools, message",
    [
        ("get_weather", r"tools: expected a list"),
        ([WEATHER, {"type": "function"}], r"tools\[1\]: expected an OpenAI function schema"),
        ([{"type": "function", "function": {"name": "a b"}}], r"tools\[0\]\.function\.name: expected a name"),
        ([{"function": {"name": "f", "parameters": []}}], r"tools\[0\]\.function\.parameters: expected"),
        ([WEATHER, WEATHER], r"tools\[1\]: a second tool named 'get_weather'"),
        ([undocumented], r"tools\[0\]: cannot describe 'undocumented' as a tool: .*docstring"),
    ],
)
def test_bad_tools_are_one_line_naming_the_item(tools, message):
    with pytest.raises(Qwen35Error, match=message):
        tool_schemas(tools)


# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "param, text, value",
    [
        ("s", "two\nlines", "two\nlines"),
        ("s", "42", "42"),
        ("i", "42", 42),
        ("i", "-7", -7),
        ("i", "1e3", 1000),
        ("n", "2.5", 2.5),
        ("n", "3", 3),
        ("b", "true", True),
        ("b", "False", False),  # the template writes Python's False
        ("z", "null", None),
        ("o", '{"k": [1, {"x": null}]}', {"k": [1, {"x": None}]}),
        ("a", '[1, "two", [3]]', [1, "two", [3]]),
        ("e", "high", "high"),
        ("opt", "null", None),
        ("opt", "5", 5),
        ("either", "5", 5),
        ("either", "five", "five"),
        ("any", '{"a": 1}', {"a": 1}),
        ("any", "words", "words"),
    ],
)
def test_every_schema_type_parses_to_its_python_value(param, text, value):
    call = parse_call(inner(call_text("every", {"s": "x", param: text})), [EVERY_TYPE])
    assert call.valid, call.error
    assert call.name == "every" and call.arguments[param] == value
    assert type(call.arguments[param]) is type(value)


@pytest.mark.parametrize(
    "raw, error",
    [
        (inner(call_text("nope", {"s": "x"})), r"unknown function 'nope' \(the tools are every\)"),
        (inner(call_text("every", {"s": "x", "i": "3.5"})), r"parameter 'i': expected an integer, got '3.5'"),
        (inner(call_text("every", {"s": "x", "i": "ten"})), r"parameter 'i': expected an integer"),
        (inner(call_text("every", {"s": "x", "n": "NaN"})), r"parameter 'n': expected a number"),
        (inner(call_text("every", {"s": "x", "b": "yes"})), r"parameter 'b': expected true or false, got 'yes'"),
        (inner(call_text("every", {"s": "x", "o": "[1]"})), r"parameter 'o': expected a JSON object"),
        (inner(call_text("every", {"s": "x", "a": "{'a': 1"})), r"parameter 'a': expected a JSON array"),
        (inner(call_text("every", {"s": "x", "z": "0"})), r"parameter 'z': expected null"),
        (inner(call_text("every", {"s": "x", "e": "mid"})), r"parameter 'e': expected one of \"low\", \"high\""),
        (inner(call_text("every", {"i": "1"})), r"missing required parameter 's'"),
        (inner(call_text("every", {"s": "x", "color": "red"})), r"unknown parameter 'color'"),
        ("\nsome garbage\n", r"expected one <function=NAME>"),
        ("\n<function=every>\n<parameter=s>\nx\n</parameter>\n", r"expected <function=NAME>…</function>"),
        ("<function=every></function><function=every></function>", r"expected one <function=NAME>"),
    ],
)
def test_malformed_calls_are_invalid_with_their_raw_text(raw, error):
    call = parse_call(raw, [EVERY_TYPE])
    assert not call.valid and re.search(error, call.error), call.error
    assert call.raw == raw


def test_a_call_left_open_is_invalid():
    raw = "\n<function=every>\n<parameter=s>\nhal"
    call = parse_call(raw, [EVERY_TYPE], closed=False)
    assert (call.name, call.raw, call.valid) == ("every", raw, False)
    assert "left open" in call.error


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_parsing_never_raises(raw):
    for text in (raw, f"\n<function=every>\n{raw}\n</function>\n", inner(call_text("every", {"s": raw, "i": raw}))):
        parse_call(text, [EVERY_TYPE])
        parse_call(text, [EVERY_TYPE], closed=False)


def test_as_message_is_the_openai_tool_calls_item():
    call = parse_call(inner(call_text("get_weather", {"city": "Paris"})), [WEATHER])
    assert call.id.startswith("call_") and call.id != parse_call(call.raw, [WEATHER]).id
    assert call.as_message() == {
        "id": call.id,
        "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
    }


# ---------------------------------------------------------------- streaming


class FakeTokenizer:
    """Each "token" i detokenizes to ``segments[i]``: any split of a text into streamed pieces."""

    _special_tokens = SpecialTokens(stop=frozenset({-1}))

    def __init__(self, segments: list[str]):
        outer = self

        class Detok:
            def reset(self):
                self.last_segment = ""

            def add_token(self, i):
                self.last_segment = outer.segments[i]

            def finalize(self):
                self.last_segment = ""

        self.segments = segments
        self.detokenizer = Detok()


def stream_pieces(segments: list[str], *, reasoning=True, stop=(), tools=(EVERY_TYPE,)):
    stream = TextStream(FakeTokenizer(segments), reasoning=reasoning, stop=stop, tools=tools)
    pieces = [p for i in range(len(segments)) for p in stream.add(i)] + stream.finish()
    return stream, pieces


FORBIDDEN = ("<tool_call", "</tool_call", "<function=", "<parameter=")
plain = st.text(alphabet="ab <>/=_\nfunctioparm", max_size=30).filter(
    lambda t: not any(f in t for f in FORBIDDEN + ("think>",))
)
values = st.one_of(
    st.builds(lambda v: ("s", v, v), st.text(alphabet="xyz <\n", min_size=1, max_size=8).filter(str.strip)),
    st.builds(lambda v: ("i", str(v), v), st.integers(-(10**12), 10**12)),
    st.builds(lambda v: ("b", "true" if v else "false", v), st.booleans()),
    st.builds(lambda v: ("a", json.dumps(v), v), st.lists(st.integers(0, 9), max_size=3)),
    st.builds(lambda v: ("o", json.dumps(v), v), st.dictionaries(st.sampled_from("pq"), st.integers(0, 9))),
)


def split_at(text: str, cuts: list[int]) -> list[str]:
    bounds = sorted({0, len(text), *cuts})
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


@settings(max_examples=300, deadline=None)
@given(
    reasoning=st.text(alphabet="ab \n", max_size=20),
    before=plain,
    calls=st.lists(st.lists(values, max_size=3), min_size=1, max_size=3),
    after=plain,
    data=st.data(),
)
def test_any_split_gives_the_same_pieces_and_calls(reasoning, before, calls, after, data):
    expected_args = [{"s": "x", **{p: v for p, _, v in c}} for c in calls]
    markups = [call_text("every", {"s": "x", **{p: t for p, t, _ in c}}) for c in calls]
    text = f"{reasoning}\n</think>\n\n{before}\n\n" + "\n".join(markups) + after
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=12))
    stream, pieces = stream_pieces(split_at(text, cuts))
    whole, _ = stream_pieces([text])
    joined = {k: "".join(p.text for p in pieces if p.kind == k) for k in ("reasoning", "answer", "tool_call")}
    assert joined == {k: "".join(v) for k, v in whole.parts.items()} == {k: "".join(v) for k, v in stream.parts.items()}
    # Whitespace before a call, and after the last one at the end, is not answer text.
    assert joined == {
        "reasoning": reasoning,
        "answer": before.rstrip() + (after if after.strip() else ""),
        "tool_call": "".join(markups),
    }
    assert [(c.name, c.arguments, c.error) for c in stream.tool_calls] == [("every", a, None) for a in expected_args]
    assert [c.raw for c in stream.tool_calls] == [inner(m) for m in markups]
    assert [p.call for p in pieces if p.call] == stream.tool_calls
    assert not any(f in p.text for p in pieces if p.kind == "answer" for f in FORBIDDEN)


@settings(max_examples=100, deadline=None)
@given(text=plain, data=st.data())
def test_without_calls_the_answer_is_the_text(text, data):
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=8))
    stream, pieces = stream_pieces(split_at(text, cuts), reasoning=False)
    assert "".join(p.text for p in pieces) == text and stream.tool_calls == []
    assert all(p.kind == "answer" for p in pieces)


def test_a_call_open_at_the_end_comes_back_invalid():
    text = "Checking.\n<tool_call>\n<function=every>\n<parameter=s>\nab"
    stream, pieces = stream_pieces(list(text), reasoning=False)
    (call,) = stream.tool_calls
    assert "left open" in call.error and call.raw == text.split("<tool_call>")[1]
    assert pieces[-1].call is call
    assert "".join(stream.parts["answer"]) == "Checking."


def test_stop_strings_apply_before_calls_are_taken_out():
    text = "A.\n" + call_text("every", {"s": "x"}) + "B. STOP C."
    stream, pieces = stream_pieces(list(text), reasoning=False, stop=["STOP"])
    assert "".join(stream.parts["answer"]) == "A.B. " and [c.arguments for c in stream.tool_calls] == [{"s": "x"}]


def test_without_tools_markup_is_answer_text():
    text = call_text("every", {"s": "x"})
    stream, pieces = stream_pieces([text], reasoning=False, tools=())
    assert "".join(stream.parts["answer"]) == text and stream.tool_calls == []


# ---------------------------------------------------------------- the test template against the official one

TOOL_CONVERSATIONS = {
    # content empty: the call follows the think block directly
    "empty_content": [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "Call it.",
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": "sunny"},
    ],
    # content, several calls with nested arguments, consecutive tool results, then a new user query
    "several_calls": [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Compare Paris and Oslo."},
        {
            "role": "assistant",
            "content": "Checking both.",
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": [1]}}},
                {"function": {"name": "every", "arguments": {"s": "x", "o": {"k": [1, {"v": None}]}, "b": True}}},
                {"name": "every", "arguments": {"s": "bare call, no 'function' wrapper", "z": None}},
            ],
        },
        {"role": "tool", "content": '{"temp": 21}'},
        {"role": "tool", "content": [{"type": "text", "text": "cold"}]},
        {"role": "tool", "content": "ok"},
        {"role": "assistant", "content": "Paris is warmer.", "reasoning_content": "21 > cold."},
        {"role": "user", "content": "Thanks."},
    ],
    # tool responses sent as a user message are not the user's query: the reasoning after it stays
    "results_as_user_text": [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "Ask the tool.",
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}],
        },
        {"role": "user", "content": "<tool_response>\nhot\n</tool_response>"},
        {"role": "assistant", "content": "It is hot.", "reasoning_content": "Hot."},
    ],
}


@pytest.fixture(scope="module")
def test_template(qwen35_tokenizer):
    return qwen35_tokenizer


def system_block(text: str) -> tuple[str, str]:
    head, sep, rest = text.partition("<|im_end|>\n")
    assert head.startswith("<|im_start|>system\n") and sep
    return head + sep, rest


@requires_reference
@pytest.mark.parametrize("thinking", [False, True])
@pytest.mark.parametrize("name", TOOL_CONVERSATIONS)
def test_test_template_renders_tool_turns_as_the_official_one(official_tokenizer, test_template, name, thinking):
    messages = TOOL_CONVERSATIONS[name]
    # Without tools= the whole text is compared: calls, results and kept reasoning.
    ours, official = (render_text(t, messages, enable_thinking=thinking) for t in (test_template, official_tokenizer))
    assert ours == official
    # With tools= the system block's preamble is ours; everything after it is compared.
    tools = [WEATHER, EVERY_TYPE]
    ours, official = (
        render_text(t, messages, enable_thinking=thinking, tools=tools) for t in (test_template, official_tokenizer)
    )
    (ours_system, ours_rest), (official_system, official_rest) = system_block(ours), system_block(official)
    assert ours_rest == official_rest
    # Both systems blocks list each tool as its JSON line and end with the system prompt.
    for block in (ours_system, official_system):
        assert all("\n" + json.dumps(t, ensure_ascii=False) + "\n" in block for t in tools)
        assert block.endswith("\n\nUse tools.<|im_end|>\n") == (messages[0]["role"] == "system")


def test_test_template_lists_the_tools_in_a_system_block(test_template):
    text = render_text(test_template, [{"role": "user", "content": "Hi"}], tools=[WEATHER])
    system, rest = system_block(text)
    assert "\n" + json.dumps(WEATHER) + "\n" in system and "<function=NAME>" in system
    assert rest.startswith("<|im_start|>user\nHi<|im_end|>\n")


@requires_reference
def test_calls_rendered_by_the_official_template_parse_back(official_tokenizer):
    args = [
        {"city": "Paris", "days": [1, 2]},
        {"s": "multi\nline", "i": 7, "n": 0.25, "b": False, "z": None, "o": {"k": {"deep": [1, "x"]}}, "a": [[1], {}]},
    ]
    names = ["get_weather", "every"]
    calls = [{"type": "function", "function": {"name": n, "arguments": a}} for n, a in zip(names, args)]
    messages = [{"role": "user", "content": "Go."}, {"role": "assistant", "content": "On it.", "tool_calls": calls}]
    text = render_text(official_tokenizer, messages, add_generation_prompt=False)
    raws = re.findall(r"<tool_call>(.*?)</tool_call>", text, re.DOTALL)
    parsed = [parse_call(raw, [WEATHER, EVERY_TYPE]) for raw in raws]
    assert [(c.name, c.arguments, c.error) for c in parsed] == [(n, a, None) for n, a in zip(names, args)]


# ---------------------------------------------------------------- end to end on the tiny model

CALL = call_text("get_weather", {"city": "Paris", "days": "[1, 2]"})


@pytest.mark.parametrize("think", [False, True])
def test_generate_returns_the_forced_call(chat_model, think):
    model, tok = chat_model
    reply = ("Plan.\n</think>\n\n" if think else "") + "Let me look.\n\n" + CALL
    force = forcing(tok, reply)
    options = dict(tools=[WEATHER], processors=[force], think=think, sampling=GREEDY, max_tokens=80)
    result = generate(model, tok, "Weather in Paris?", **options)
    assert result.tokens == force.ids  # the model ran every token, masked to the target
    assert result.finish_reason == "tool_calls"
    assert result.text == "Let me look." and result.reasoning == ("Plan." if think else "")
    expected = [("get_weather", {"city": "Paris", "days": [1, 2]}, True)]
    assert [(c.name, c.arguments, c.valid) for c in result.tool_calls] == expected
    gen = stream_generate(model, tok, "Weather in Paris?", **options)
    pieces = list(gen)
    assert "".join(p.text for p in pieces if p.kind == "tool_call") == CALL
    assert [p.call for p in pieces if p.call] == gen.result.tool_calls
    assert [(c.name, c.arguments) for c in gen.result.tool_calls] == [(c.name, c.arguments) for c in result.tool_calls]
    assert gen.result.finish_reason == "tool_calls" and gen.result.text == result.text


def test_prompt_lists_the_tools(chat_model):
    model, tok = chat_model
    result = generate(model, tok, "Hi", tools=[get_time], processors=[forcing(tok, "Hello.")], max_tokens=5)
    expected = render_text(tok, [{"role": "user", "content": "Hi"}], tools=tool_schemas([get_time]))
    assert result.prompt_tokens == len(tok.encode(expected, add_special_tokens=False))
    assert result.finish_reason == "stop" and result.tool_calls == [] and result.text == "Hello."


def test_a_call_cut_at_the_token_limit_is_invalid(chat_model):
    model, tok = chat_model
    force = forcing(tok, CALL)
    result = generate(model, tok, "Weather?", tools=[WEATHER], processors=[force], max_tokens=6)
    (call,) = result.tool_calls
    assert result.finish_reason == "length" and not call.valid and "left open" in call.error
    assert result.text == "" and call.raw == tok.decode(force.ids[:6]).split("<tool_call>")[1]


def test_an_invalid_call_does_not_crash_generation(chat_model):
    model, tok = chat_model
    bad = call_text("get_weather", {"town": "Paris"})
    result = generate(model, tok, "Weather?", tools=[WEATHER], processors=[forcing(tok, bad)], max_tokens=60)
    (call,) = result.tool_calls
    assert result.finish_reason == "tool_calls" and call.name == "get_weather"
    assert call.error == "unknown parameter 'town'; missing required parameter 'city'"
