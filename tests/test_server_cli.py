"""``mlx_qwen35 serve``: refusals before anything loads, and a real process stopped by Ctrl-C."""

from __future__ import annotations

import http.client
import json
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from test_cli import invoke, one_error_line

from mlx_qwen35.server.cli import parse_size

TIMEOUT = 120


def test_another_address_without_a_key_is_refused():
    line = one_error_line(invoke("serve", "--host", "0.0.0.0"))
    assert "--host 0.0.0.0: not a loopback address; pass --api-key KEY, or --allow-public" in line


def test_bad_sizes_and_a_taken_port_are_one_line():
    assert "--cache-memory: expected a size like 2GiB" in one_error_line(invoke("serve", "--cache-memory", "lots"))
    assert "--max-body: expected a size" in one_error_line(invoke("serve", "--max-body", "1XB"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert f"--port {port}: cannot listen there" in one_error_line(invoke("serve", "--port", port))


def test_sizes():
    assert [parse_size("x", s) for s in ("512", "2GiB", "1.5 MB", "64kib")] == [512, 2 << 30, 1_500_000, 64 << 10]


def test_ctrl_c_ends_open_streams_and_the_process_cleanly(chat_model_dir):
    root = Path(__file__).parents[1]
    cmd = [sys.executable, "-m", "mlx_qwen35.cli", "serve", "--model", str(chat_model_dir), "--port", "0"]
    proc = subprocess.Popen(cmd, cwd=root, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    try:
        port = None
        deadline = time.monotonic() + TIMEOUT
        while port is None:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            m = re.search(r"serving .* at http://127\.0\.0\.1:(\d+)/v1", line)
            port = m and int(m.group(1))
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        conn.request("POST", "/v1/chat/completions", json.dumps(body))
        assert json.loads(conn.getresponse().read())["usage"]["completion_tokens"] == 2
        conn.request("POST", "/v1/chat/completions", json.dumps({**body, "max_tokens": 4000, "stream": True}))
        stream = conn.getresponse()
        assert stream.readline().startswith(b"data: ")  # the generation runs
        proc.send_signal(signal.SIGINT)
        rest = stream.read().decode()  # the stream ends at once: the server is stopping
        assert "the server is shutting down" in rest and rest.endswith("data: [DONE]\n\n")
        assert proc.wait(TIMEOUT) == 0
    finally:
        proc.kill()
    err = "".join(lines.queue)
    assert "Traceback" not in err and "stopped" in err
    assert len(re.findall(r"chatcmpl-\w+ prompt=\d+ cached=\d+ generated=2 tok/s=[\d.]+ finish=length", err)) == 1
