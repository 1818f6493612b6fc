"""Tools through the server: the model's output steered by a forcing logits processor (the model still runs).

The worker's ``processors`` hook (for tests; no HTTP field) adds the processor.
"""

from __future__ import annotations

import json

import mlx.core as mx
import pytest
from forcing import forcing
from serving import MODEL_ID
from test_tokenizer import WEATHER_TOOL

TOOLS = [WEATHER_TOOL]
ASK = [{"role": "user", "content": "What's the weather in Paris for the next days?"}]
# Written as the chat template writes a call back, so that the next request's prompt starts with the reply.
CALL = (
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
    "<parameter=days>\n[1, 2]\n</parameter>\n</function>\n</tool_call>"
)


@pytest.fixture
def steer(server_worker):
    """``steer(text or processor)``: the worker's next requests write that; undone after the test."""

    def set_to(what):
        processor = forcing(server_worker.tokenizer, what) if isinstance(what, str) else what
        server_worker.processors = lambda job: [processor]

    yield set_to
    server_worker.processors = None


def test_a_call_comes_back_as_tool_calls_streamed_or_not(served, steer, chat_model):
    _, tok = chat_model
    steer(CALL)
    client = served.client()
    r = client.chat.completions.create(model=MODEL_ID, messages=ASK, tools=TOOLS, max_tokens=80)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": [1, 2]}
    ids = tok.apply_chat_template(ASK, tools=TOOLS, add_generation_prompt=True, enable_thinking=False)
    assert r.usage.prompt_tokens == len(ids)

    chunks = list(client.chat.completions.create(model=MODEL_ID, messages=ASK, tools=TOOLS, max_tokens=80, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == ""  # no markup leaks into the text
    (item,) = [t for d in deltas for t in d.tool_calls or ()]
    assert (item.index, item.function.name) == (0, "get_weather")
    assert json.loads(item.function.arguments) == {"city": "Paris", "days": [1, 2]}
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_an_invalid_call_is_shown_as_text(served, steer):
    bad = CALL.replace("get_weather", "get_time")
    steer(bad)
    r = served.client().chat.completions.create(model=MODEL_ID, messages=ASK, tools=TOOLS, max_tokens=80)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == bad


def test_tool_choice_none_bans_the_call_token(served, steer, chat_model):
    _, tok = chat_model
    call = tok.convert_tokens_to_ids("<tool_call>")
    # The model is made to want nothing more than to open a call.
    steer(lambda tokens, logits: logits + 100.0 * (mx.arange(logits.shape[-1]) == call))
    client = served.client()
    eager = client.chat.completions.create(model=MODEL_ID, messages=ASK, tools=TOOLS, max_tokens=3, temperature=0)
    # It opened a call, left open at the token limit: invalid, so shown as the text it is.
    assert eager.choices[0].message.content.startswith("<tool_call>")
    r = client.chat.completions.create(
        model=MODEL_ID, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=3, temperature=0
    )
    assert r.choices[0].message.content and r.choices[0].message.tool_calls is None
    assert "<tool_call>" not in r.choices[0].message.content


def test_an_agent_conversation_prefills_only_its_new_messages(served, steer, chat_model):
    """Ten requests, each the previous messages, the assistant's call and a new tool result."""
    _, tok = chat_model
    steer(CALL)
    client = served.client()
    history = [{"role": "system", "content": "You are an agent; call tools."}, *ASK]  # as the template reads it
    for step in range(10):
        messages = [sent(m) for m in history]  # as a client sends it: arguments as JSON strings
        r = client.chat.completions.create(model=MODEL_ID, messages=messages, tools=TOOLS, max_tokens=80)
        prompt = tok.apply_chat_template(history, tools=TOOLS, add_generation_prompt=True, enable_thinking=False)
        assert r.usage.prompt_tokens == len(prompt)
        if step > 0:
            # Everything before the new tool message came from the cache: the previous prompt and its reply.
            before = tok.apply_chat_template(history[:-1], tools=TOOLS, add_generation_prompt=False)
            assert prompt[: len(before)] == before
            assert r.usage.prompt_tokens_details.cached_tokens == len(before)
        message = r.choices[0].message
        calls = [{"id": c.id, "type": "function",
                  "function": {"name": c.function.name, "arguments": json.loads(c.function.arguments)}}
                 for c in message.tool_calls]
        result = {"city": "Paris", "forecast": ["sunny", "rain", "cloudy"][step % 3], "step": step}
        history += [
            {"role": "assistant", "content": message.content, "tool_calls": calls},
            {"role": "tool", "tool_call_id": calls[0]["id"], "content": json.dumps(result)},
        ]


def sent(message: dict) -> dict:
    if "tool_calls" not in message:
        return message
    calls = [{**c, "function": {**c["function"], "arguments": json.dumps(c["function"]["arguments"])}}
             for c in message["tool_calls"]]
    return {**message, "tool_calls": calls}
