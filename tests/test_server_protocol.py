"""The request checks alone (no model): whatever JSON arrives, the answer is parameters or one ApiError."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlx_qwen35.server.protocol import ApiError, ChatParams, parse_chat, parse_json

FIELDS = [
    "model", "messages", "tools", "tool_choice", "max_tokens", "max_completion_tokens", "temperature", "top_p",
    "top_k", "min_p", "presence_penalty", "repetition_penalty", "seed", "stop", "stream", "stream_options",
    "chat_template_kwargs", "thinking_budget", "n", "logprobs", "response_format", "frequency_penalty",
]
MESSAGE_KEYS = ["role", "content", "tool_calls", "reasoning_content", "type", "text", "image_url", "url", "function",
                "name", "arguments", "enable_thinking", "include_usage"]
scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12) | st.sampled_from(
    ["user", "system", "assistant", "tool", "robot", "text", "image_url", "auto", "none", "data:,", "{}", "tiny"]
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(MESSAGE_KEYS), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=8))
def test_any_request_is_parameters_or_one_error_line(body):
    try:
        params = parse_chat(parse_json(json.dumps(body).encode()), "tiny")
    except ApiError as e:
        assert e.status in (400, 404) and e.message and "\n" not in e.message
    else:
        assert isinstance(params, ChatParams) and params.messages
