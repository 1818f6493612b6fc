"""Chat with tools: the reply's calls, tool results, the cache across tool turns, the tool loop, sessions.

The tiny random model's replies are steered by forcing processors (tests/forcing.py).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import rel_err
from forcing import scripted
from test_chat import cold_logits
from test_tools import WEATHER, call_text

from mlx_qwen35 import ask_with_tools
from mlx_qwen35.chat import Chat
from mlx_qwen35.errors import Qwen35Error
from mlx_qwen35.sampling import Sampling
from mlx_qwen35.tokenizer import render_prompt
from mlx_qwen35.tools import tool_schemas

GREEDY = Sampling(temperature=0.0)
CALL = call_text("get_weather", {"city": "Paris", "days": "[1, 2]"})
ARGS = {"city": "Paris", "days": [1, 2]}


def get_weather(city: str, days: list[int] = None) -> dict:
    """Weather forecast for a city.

    Args:
        city: The city.
        days: Which days ahead.
    """
    if city == "Atlantis":
        raise ValueError("no such city")
    return {"city": city, "sky": "sunny"}


def suffix_tokens(tok, before: list[dict], after: list[dict], tools, think: bool) -> int:
    """Tokens of what ``after`` (a rendered prompt) adds to ``before`` (a finished conversation), minus its end.

    Rendered with the tokenizer's own apply_chat_template: the cache holds
    ``before`` but its last <|im_end|>\\n, which the model never fed.
    """
    render = dict(tools=tools, tokenize=False, enable_thinking=think)
    old = tok.apply_chat_template(before, add_generation_prompt=False, **render)
    new = tok.apply_chat_template(after, add_generation_prompt=True, **render)
    end = "<|im_end|>\n"
    assert old.endswith(end) and new.startswith(old)
    return len(tok.encode(new[len(old) - len(end) :], add_special_tokens=False))


@pytest.mark.parametrize("think", [False, True])
def test_a_tool_step_prefills_only_the_results_and_the_generation_prompt(chat_model, think):
    model, tok = chat_model
    thought = "Plan.\n</think>\n\n" if think else ""
    force = scripted(tok, [thought + "Let me look.\n\n" + CALL, thought + "Sunny.", thought + "Bye."])
    chat = Chat(model, tok, tools=[WEATHER], think=think, sampling=GREEDY, max_tokens=80, system="Be brief.")
    first = chat.ask("Weather in Paris?", processors=[force])
    assert first.finish_reason == "tool_calls" and first.tokens == force.rounds[0].ids
    (call,) = first.tool_calls
    assert chat.messages[-1] == {
        "role": "assistant",
        "content": "Let me look.",
        **({"reasoning_content": "Plan."} if think else {}),
        "tool_calls": [{"id": call.id, "type": "function", "function": {"name": "get_weather", "arguments": ARGS}}],
    }
    gen = chat.send_tool_results(['{"temp": 21}'], processors=[force])
    list(gen)
    results = {"role": "tool", "tool_call_id": call.id, "name": "get_weather", "content": '{"temp": 21}'}
    assert chat.messages[-2] == results
    assert gen.result.text == "Sunny." and gen.result.finish_reason == "stop"
    system = [{"role": "system", "content": "Be brief."}]
    before, after = system + chat.messages[:2], system + chat.messages[:3]
    assert gen.result.prefilled_tokens == suffix_tokens(tok, before, after, [WEATHER], think)
    # the cache as the reply left it, plus the results, is the cold prefill of the whole prompt
    ids = render_prompt(tok, after, enable_thinking=think, tools=[WEATHER])
    assert gen.result.prompt_tokens == len(ids)
    assert rel_err(np.array(gen.prompt_logits), cold_logits(model, ids)) < 1e-5
    # a new user message after the tool loop is still exact
    gen = chat.send("Thanks.", processors=[force])
    list(gen)
    ids = render_prompt(tok, system + chat.messages[:-1], enable_thinking=think, tools=[WEATHER])
    assert rel_err(np.array(gen.prompt_logits), cold_logits(model, ids)) < 1e-5


def test_ask_with_tools_runs_the_functions_until_the_answer(chat_model):
    model, tok = chat_model
    seen = []

    def weather(city: str, days: list[int] = None) -> dict:
        seen.append((city, days))
        return get_weather(city, days)

    weather.__doc__ = get_weather.__doc__
    weather.__name__ = "get_weather"
    force = scripted(tok, [CALL, "It is sunny."])
    chat = Chat(model, tok, tools=[weather], sampling=GREEDY, max_tokens=80)
    result = ask_with_tools(chat, "Weather in Paris?", processors=[force])
    assert seen == [("Paris", [1, 2])]
    assert (result.text, result.finish_reason) == ("It is sunny.", "stop")
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "tool", "assistant"]
    assert chat.messages[2]["content"] == '{"city": "Paris", "sky": "sunny"}'
    assert result is chat.history[-1] and len(chat.history) == 2


def test_failing_and_invalid_calls_become_results_not_crashes(chat_model):
    model, tok = chat_model
    calls = call_text("get_weather", {"city": "Atlantis"}) + "\n" + call_text("get_weather", {"town": "Rome"})
    chat = Chat(model, tok, tools=[get_weather, WEATHER | {"function": {"name": "unbound"}}], sampling=GREEDY)
    calls += "\n" + call_text("unbound", {})
    result = ask_with_tools(chat, "Weather?", processors=[scripted(tok, [calls, "Sorry."])])
    assert result.text == "Sorry."
    assert [m["content"] for m in chat.messages if m["role"] == "tool"] == [
        "error: ValueError: no such city",
        "error: invalid call: unknown parameter 'town'; missing required parameter 'city'",
        "error: no Python function is bound to the tool 'unbound'",
    ]


def test_the_loop_stops_after_max_steps(chat_model):
    model, tok = chat_model
    chat = Chat(model, tok, tools=[get_weather], sampling=GREEDY, max_tokens=80)
    result = ask_with_tools(chat, "Weather?", max_steps=2, processors=[scripted(tok, [CALL])])
    assert result.finish_reason == "tool_calls" and len(chat.history) == 3
    assert [m["role"] for m in chat.messages].count("tool") == 2


def test_tool_results_are_checked_against_the_calls(chat_model):
    model, tok = chat_model
    chat = Chat(model, tok, tools=[WEATHER], sampling=GREEDY, max_tokens=80)
    with pytest.raises(Qwen35Error, match="tool results: the last reply called no tools"):
        chat.send_tool_results(["x"])
    chat.ask("Weather?", processors=[scripted(tok, [CALL])])
    call_id = chat.messages[-1]["tool_calls"][0]["id"]
    for results, message in [
        (["a", "b"], r"2 given for the last reply's 1 calls"),
        ("sunny", r"expected a list"),
        ([{"text": "x"}], r"tool results\[0\]: expected 'content'"),
        ([{"content": "x", "tool_call_id": "call_0"}], rf"\.tool_call_id: 'call_0', but the call's is '{call_id}'"),
        ([{"content": "x", "name": "other"}], r"tool results\[0\]\.name: 'other'"),
    ]:
        with pytest.raises(Qwen35Error, match=message):
            chat.send_tool_results(results)
    result = {"content": {"temp": 21}, "name": "get_weather", "tool_call_id": call_id}
    list(chat.send_tool_results([result], processors=[scripted(tok, ["Ok."])]))
    assert chat.messages[-2]["content"] == '{"temp": 21}'


def test_a_session_keeps_tool_schemas_and_binds_functions_again(chat_model, tmp_path):
    model, tok = chat_model
    a = Chat(model, tok, tools=[get_weather], sampling=GREEDY, max_tokens=80)
    a.ask("Weather in Paris?", processors=[scripted(tok, [CALL])])
    path = a.save(tmp_path / "tools.session")
    plain = Chat.load(path, model, tok)
    assert plain.tools == tool_schemas([get_weather]) and plain.messages == a.messages
    with pytest.raises(Qwen35Error, match=r"tools: '_elsewhere' is not one of the session's tools \(get_weather\)"):
        Chat.load(path, model, tok, tools=[_elsewhere])
    b = Chat.load(path, model, tok, tools=[get_weather])
    assert b.tools == [get_weather]
    # resumed, the tool step goes on from the saved cache exactly as the original chat does
    results = []
    for chat in (a, b):
        gen = chat.send_tool_results(["sunny"], processors=[scripted(tok, ["Good."])])
        list(gen)
        results.append(gen)
    assert results[0].result.tokens == results[1].result.tokens
    expected = suffix_tokens(tok, a.messages[:2], a.messages[:3], tool_schemas([get_weather]), False)
    assert results[0].result.prefilled_tokens == results[1].result.prefilled_tokens == expected
    np.testing.assert_array_equal(np.array(results[0].prompt_logits), np.array(results[1].prompt_logits))


def _elsewhere(x: int) -> int:
    """Not in the session.

    Args:
        x: Anything.
    """
    return x
