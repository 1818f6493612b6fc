"""A server started in this process on a free loopback port, and plain HTTP calls to it.

The tests talk to it with the real ``openai`` client, or with ``http.client``
where they need what a client library hides (a raw body, a dropped connection).
"""

from __future__ import annotations

import http.client
import json
import logging
import threading
import time
from typing import Optional

import pytest

from mlx_qwen35.server.app import Server, bind, make_app
from mlx_qwen35.server.worker import Worker

TIMEOUT = 120  # seconds any one call may take before a test fails instead of hanging
MODEL_ID = "tiny-qwen35"
MAX_BODY = 64 << 10


class Served:
    """``with Served(worker, ...) as s:`` serves ``worker`` at ``s.url`` (``make_app``'s options)."""

    def __init__(self, worker, **options):
        self.worker = worker
        self.sock = bind("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = Server(make_app(worker, MODEL_ID, **options), worker)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "Served":
        self.thread.start()
        deadline = time.monotonic() + TIMEOUT
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(TIMEOUT)

    def client(self, api_key: str = "unused"):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=TIMEOUT)

    def connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=TIMEOUT)

    def call(self, method: str, path: str, body=None, headers: Optional[dict] = None):
        """``(status, headers, JSON)`` of one request; ``body`` a dict (sent as JSON) or bytes."""
        conn = self.connect()
        if isinstance(body, dict):
            body = json.dumps(body).encode()
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        payload = r.read()
        conn.close()
        return r.status, dict(r.getheaders()), json.loads(payload) if payload else None

    def post(self, body, headers: Optional[dict] = None):
        return self.call("POST", "/v1/chat/completions", body, headers)


def open_stream(served: Served, body: dict):
    """A streamed completion's connection and response, before any of it is read."""
    conn = served.connect()
    conn.request("POST", "/v1/chat/completions", body=json.dumps({**body, "stream": True}).encode(),
                 headers={"Content-Type": "application/json"})
    return conn, conn.getresponse()


def read_events(response, n: int) -> list[dict]:
    """The next ``n`` server-sent events' JSON."""
    out = []
    while len(out) < n:
        line = response.readline()
        assert line, "the stream ended early"
        if line.startswith(b"data: {"):
            out.append(json.loads(line[6:]))
    return out


class Records(logging.Handler):
    """The server's log lines: ``stats(id)`` are those of one finished request."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record) -> None:
        self.records.append(record)

    def stats(self, request_id: str) -> dict:
        deadline = time.monotonic() + TIMEOUT
        while True:
            found = [r.stats for r in self.records if hasattr(r, "stats") and r.args[0] == request_id]
            if found:
                return found[0]
            assert time.monotonic() < deadline, f"no log line for {request_id}"
            time.sleep(0.01)


# Fixtures (a plugin of conftest.py): each test module gets its own worker (batches of 2, a queue of 1) and server.


@pytest.fixture(scope="module")
def server_worker(chat_model):
    w = Worker(lambda: chat_model, queue_size=1, cache_memory=1 << 30, batch_size=2)
    w.start()
    yield w
    w.stop(TIMEOUT)


@pytest.fixture(scope="module")
def served(server_worker):
    with Served(server_worker, max_body=MAX_BODY) as s:
        yield s


@pytest.fixture(scope="module")
def server_log():
    records, logger = Records(), logging.getLogger("mlx_qwen35.server")
    logger.addHandler(records)
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(records)
