"""mlx_qwen35 serve, through the real openai client and raw HTTP, on a tiny random model.

The expected answers come from ``mlx_qwen35.generate`` with the same messages,
and the token counts from the tokenizer's own ``apply_chat_template``.
"""

from __future__ import annotations

import base64
import io
import threading
import time

import numpy as np
import openai
import pytest
from PIL import Image
from serving import MAX_BODY, MODEL_ID, TIMEOUT, Served, open_stream, read_events

from mlx_qwen35.generate import generate
from mlx_qwen35.sampling import Sampling

GREEDY = Sampling(temperature=0.0)
# Greedy, and without the preset's presence penalty, as generate(sampling=GREEDY) runs.
GREEDY_FIELDS = {"temperature": 0, "presence_penalty": 0}
SEA = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about the sea."}]


def template_ids(tok, messages, **options) -> list[int]:
    return tok.apply_chat_template(messages, add_generation_prompt=True, **options)


def streamed(client, messages, **fields):
    chunks = list(client.chat.completions.create(
        model=MODEL_ID, messages=messages, stream=True, stream_options={"include_usage": True}, **fields
    ))
    choices = [c.choices[0] for c in chunks if c.choices]
    text = "".join(c.delta.content or "" for c in choices)
    reasoning = "".join(getattr(c.delta, "reasoning_content", None) or "" for c in choices)
    return text, reasoning, choices[-1].finish_reason, chunks[-1].usage


def test_greedy_answers_equal_generate_streamed_or_not(served, chat_model):
    model, tok = chat_model
    expected = generate(model, tok, SEA, sampling=GREEDY, max_tokens=8)
    ids = template_ids(tok, SEA, enable_thinking=False)
    client = served.client()
    r = client.chat.completions.create(model=MODEL_ID, messages=SEA, max_tokens=8, **GREEDY_FIELDS)
    assert r.choices[0].message.content == expected.text and expected.text
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 8)
    assert r.usage.total_tokens == len(ids) + 8
    # The same prompt again: restored up to the generation prompt's <|im_start|>, the same answer.
    text, reasoning, finish, usage = streamed(client, SEA, max_tokens=8, **GREEDY_FIELDS)
    assert (text, reasoning, finish) == (expected.text, "", "length")
    assert usage.prompt_tokens == len(ids)
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    assert usage.prompt_tokens_details.cached_tokens == max(i for i, t in enumerate(ids) if t == im_start)


def test_sampling_fields_left_out_come_from_the_model_cards_preset(served, chat_model):
    model, tok = chat_model
    preset = Sampling(temperature=0.0, top_k=20, presence_penalty=2.0)  # "instruct", greedy
    expected = generate(model, tok, SEA, sampling=preset, max_tokens=6)
    r = served.client().chat.completions.create(model=MODEL_ID, messages=SEA, max_tokens=6, temperature=0)
    assert r.choices[0].message.content == expected.text


def test_stop_strings_and_seeds_act_as_in_generate(served, chat_model):
    model, tok = chat_model
    full = generate(model, tok, SEA, sampling=GREEDY, max_tokens=8).text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    expected = generate(model, tok, SEA, sampling=GREEDY, max_tokens=8, stop=[stop])
    client = served.client()
    r = client.chat.completions.create(model=MODEL_ID, messages=SEA, max_tokens=8, stop=stop, **GREEDY_FIELDS)
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (expected.text, "stop")
    sampled = generate(model, tok, SEA, max_tokens=6, seed=7)  # the instruct preset, sampled
    for _ in range(2):
        r = client.chat.completions.create(model=MODEL_ID, messages=SEA, max_tokens=6, seed=7)
        assert r.choices[0].message.content == sampled.text


def test_a_seeded_request_runs_alone_after_the_batch(served, chat_model):
    model, tok = chat_model
    sampled = generate(model, tok, SEA, max_tokens=6, seed=7)  # the instruct preset, sampled
    conn, response = open_stream(served, {"messages": SEA, "max_tokens": 24})  # sampled, no seed
    read_events(response, 2)  # it decodes
    r = served.client().chat.completions.create(model=MODEL_ID, messages=SEA, max_tokens=6, seed=7)
    assert r.choices[0].message.content == sampled.text  # no other row drew from the generator meanwhile
    conn.close()


def test_reasoning_is_separated_when_thinking_is_on(served, chat_model):
    model, tok = chat_model
    messages = [{"role": "user", "content": "Why is the sky blue?"}]
    expected = generate(model, tok, messages, think=True, thinking_budget=3, sampling=GREEDY, max_tokens=30)
    assert expected.reasoning and expected.text  # the budget closed the reasoning, then the answer came
    fields = dict(max_tokens=30, extra_body={"chat_template_kwargs": {"enable_thinking": True}, "thinking_budget": 3})
    client = served.client()
    r = client.chat.completions.create(model=MODEL_ID, messages=messages, **fields, **GREEDY_FIELDS)
    message = r.choices[0].message
    assert (message.reasoning_content, message.content) == (expected.reasoning, expected.text)
    assert r.usage.prompt_tokens == len(template_ids(tok, messages, enable_thinking=True))
    text, reasoning, _, usage = streamed(client, messages, **fields, **GREEDY_FIELDS)
    assert (reasoning, text) == (expected.reasoning, expected.text)


def png_data_url(seed: int = 0, size=(40, 32)) -> tuple[str, Image.Image]:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode(), image


def test_images_from_data_urls_and_allowed_files(served, server_worker, chat_model, tmp_path):
    model, tok = chat_model
    question = {"type": "text", "text": "What is this?"}
    system = {"role": "system", "content": "Look closely."}
    for seed in (0, 1):  # two images of one size: the same tokens, but the second must not reuse the first's state
        url, image = png_data_url(seed)
        expected = generate(model, tok, [system, {"role": "user", "content": [{"type": "image"}, question]}],
                            images=[image], sampling=GREEDY, max_tokens=4)
        messages = [system, {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, question]}]
        r = served.client().chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=4, **GREEDY_FIELDS)
        assert r.choices[0].message.content == expected.text
        assert r.usage.prompt_tokens == expected.prompt_tokens
    system_ids = tok.apply_chat_template([system], add_generation_prompt=False)
    assert r.usage.prompt_tokens_details.cached_tokens == len(system_ids)  # what comes before the image
    allowed, elsewhere = tmp_path / "allowed", tmp_path / "elsewhere"
    allowed.mkdir(), elsewhere.mkdir()
    image.save(allowed / "a.png"), image.save(elsewhere / "b.png")
    with Served(server_worker, allow_files=allowed) as files:
        for path in (f"file://{allowed / 'a.png'}", str(allowed / "a.png")):
            part = {"type": "image_url", "image_url": {"url": path}}
            body = {"messages": [{"role": "user", "content": [part, question]}], "max_tokens": 4, **GREEDY_FIELDS}
            status, _, reply = files.post(body)
            assert status == 200 and reply["choices"][0]["message"]["content"] == expected.text
        part = {"type": "image_url", "image_url": {"url": str(allowed / ".." / "elsewhere" / "b.png")}}
        status, _, reply = files.post({"messages": [{"role": "user", "content": [part, question]}]})
        assert status == 400 and "outside the folder the server may read" in reply["error"]["message"]


def user(content) -> dict:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 2}


def image_part(url: str) -> list:
    return [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is it?"}]


BAD_CALL = {"role": "assistant", "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}

BAD = [
    # (body, status, param, part of the message)
    (b"{not json", 400, None, "request body: not valid JSON"),
    (b"[1, 2]", 400, None, "request body: expected a JSON object"),
    (b'{"messages": ' + b"[" * 50000, 400, None, "request body: JSON nested too deeply"),
    (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, "request body", "lone surrogate"),
    ({"max_tokens": 2}, 400, "messages", "messages: expected a non-empty list"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role",
     "messages[0].role: expected one of system, user, assistant, tool, got 'robot'"),
    ({"messages": [{"role": "user"}]}, 400, "messages[0].content", "got null"),
    (user([{"type": "audio"}]), 400, "messages[0].content[0].type", "expected text or image_url"),
    ({**user("hi"), "temperature": -1}, 400, "temperature", "temperature: must be ≥ 0"),
    ({**user("hi"), "top_p": "high"}, 400, "top_p", "top_p: expected a number"),
    ({**user("hi"), "max_tokens": 0}, 400, "max_tokens", "max_tokens: expected a number of tokens ≥ 1, got 0"),
    ({**user("hi"), "max_completion_tokens": True}, 400, "max_completion_tokens", "got true"),
    ({**user("hi"), "seed": -3}, 400, "seed", "seed: expected an integer ≥ 0"),
    ({**user("hi"), "stop": 5}, 400, "stop", "stop: expected text or a list of texts"),
    ({**user("hi"), "n": 2}, 400, "n", "only 1 choice"),
    ({**user("hi"), "logprobs": True}, 400, "logprobs", "not supported"),
    ({**user("hi"), "tool_choice": "required"}, 400, "tool_choice", 'expected "auto" or "none"'),
    ({**user("hi"), "tools": {"type": "function"}}, 400, "tools", "expected a list of function schemas"),
    ({**user("hi"), "tools": [{"type": "function", "function": {"name": "a b"}}]}, 400,
     "tools[0].function.name", "expected a name without spaces"),
    ({**user("hi"), "chat_template_kwargs": {"enable_thinking": "yes"}}, 400,
     "chat_template_kwargs.enable_thinking", "expected true or false"),
    ({**user("hi"), "thinking_budget": -1}, 400, "thinking_budget", "≥ 0"),
    (user(image_part("https://example.com/cat.png")), 400, "messages[0].content[0].image_url.url",
     "only data: URLs"),
    (user(image_part("data:image/png;base64," + base64.b64encode(b"not an image").decode())), 400,
     "messages[0].content[0].image_url.url", "not an image Pillow can read"),
    (user(image_part("data:image/png;base64,@@@")), 400, "messages[0].content[0].image_url.url", "base64"),
    (user(image_part("/etc/hostname")), 400, "messages[0].content[0].image_url.url", "--allow-files"),
    ({"messages": [{"role": "user", "content": "hi"}, BAD_CALL]}, 400,
     "messages[1].tool_calls[0].function.arguments", "not valid JSON"),
    (user("hello " * 5000), 400, "prompt", "longer than the model's context of 4096"),
    ({**user("hi"), "model": "gpt-4"}, 404, "model", "'gpt-4' is not served here"),
    (b'{"messages": "' + b"x" * MAX_BODY + b'"}', 413, None, "larger than the server's limit"),
]


def test_bad_requests_answer_error_json_and_the_server_stays_up(served):
    client = served.client()
    for body, status, param, message in BAD:
        got, _, reply = served.post(body)
        assert got == status, (body if isinstance(body, dict) else body[:80], reply)
        error = reply["error"]
        assert message in error["message"] and error["param"] == param, error
        assert set(error) == {"message", "type", "param", "code"} and "\n" not in error["message"]
        r = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "hi"}], max_tokens=1)
        assert r.choices[0].finish_reason == "length"
    # the client library sees the same errors
    with pytest.raises(openai.BadRequestError, match="messages\\[0\\].role"):
        client.chat.completions.create(model=MODEL_ID, messages=[{"role": "robot", "content": "hi"}])
    with pytest.raises(openai.NotFoundError, match="'gpt-4' is not served here") as e:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    assert e.value.code == "model_not_found"


def test_routes_methods_models_and_health(served):
    assert served.call("GET", "/nowhere")[0] == 404
    status, headers, reply = served.call("GET", "/v1/chat/completions")
    assert status == 405 and "POST" in reply["error"]["message"]
    assert [m.id for m in served.client().models.list()] == [MODEL_ID]
    assert served.call("GET", f"/v1/models/{MODEL_ID}")[2]["id"] == MODEL_ID
    assert served.call("GET", "/v1/models/other")[0] == 404
    status, _, health = served.call("GET", "/health")
    assert status == 200 and health["status"] == "ok" and health["model"] == MODEL_ID


def test_api_key(server_worker):
    with Served(server_worker, api_key="sesame") as locked:
        body = user("hi")
        status, headers, reply = locked.post(body)
        assert status == 401 and reply["error"]["code"] == "invalid_api_key" and headers["www-authenticate"] == "Bearer"
        assert locked.post(body, {"Authorization": "Bearer wrong"})[0] == 401
        assert locked.call("GET", "/v1/models")[0] == 401
        assert locked.call("GET", "/health")[0] == 200
        with pytest.raises(openai.AuthenticationError):
            locked.client("wrong").chat.completions.create(model=MODEL_ID, messages=body["messages"])
        r = locked.client("sesame").chat.completions.create(model=MODEL_ID, messages=body["messages"], max_tokens=1)
        assert r.usage.completion_tokens == 1


LONG = {"messages": [{"role": "user", "content": "Count to a thousand."}], "max_tokens": 1000}


def test_concurrent_requests_decode_together_each_as_generate_alone(served, chat_model, monkeypatch):
    from mlx_qwen35.batch import Batch

    model, tok = chat_model
    rows, step = [], Batch.step
    monkeypatch.setattr(Batch, "step", lambda self: (rows.append(len(self.rows)), step(self))[1])
    prime = [{"role": "user", "content": "Name a prime number."}]
    first = generate(model, tok, SEA, sampling=GREEDY, max_tokens=60)
    second = generate(model, tok, prime, sampling=GREEDY, max_tokens=6)
    conn, response = open_stream(served, {"messages": SEA, "max_tokens": 60, **GREEDY_FIELDS})
    events = read_events(response, 2)  # it decodes, with most of its tokens to come
    r = served.client().chat.completions.create(model=MODEL_ID, messages=prime, max_tokens=6, **GREEDY_FIELDS)
    assert r.choices[0].message.content == second.text
    while events[-1]["choices"][0]["finish_reason"] is None:
        events += read_events(response, 1)
    conn.close()
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events) == first.text
    assert max(rows) == 2  # they shared decode steps


def test_a_client_that_disconnects_stops_its_generation(served, server_log):
    conn, response = open_stream(served, LONG)
    first = read_events(response, 4)  # the role, then three pieces: the generation runs
    conn.sock.shutdown(2), conn.close()
    r = served.client().chat.completions.create(model=MODEL_ID, messages=SEA, max_tokens=2)
    assert r.choices[0].finish_reason == "length"
    stats = server_log.stats(first[0]["id"])
    assert stats["finish"] == "interrupted" and stats["generated"] < LONG["max_tokens"]


def test_a_full_queue_answers_429_with_retry_after(served, server_worker):
    streams = [open_stream(served, LONG) for _ in range(server_worker.batch_size)]
    for _, response in streams:
        read_events(response, 2)  # running, every row of the batch taken: the queue (of 1) is empty
    waiting = {}
    second = threading.Thread(target=lambda: waiting.update(reply=served.post(user("hi"))))
    second.start()
    deadline = time.monotonic() + TIMEOUT
    while server_worker.waiting < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    status, headers, reply = served.post(user("hi"))
    assert status == 429 and int(headers["retry-after"]) >= 1
    assert reply["error"]["type"] == "rate_limit_error"
    for conn, _ in streams:
        conn.sock.shutdown(2), conn.close()
    second.join(TIMEOUT)
    assert waiting["reply"][0] == 200
