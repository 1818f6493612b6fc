"""The ``serve`` command, registered by :mod:`mlx_qwen35.cli`, with the model options ``chat`` has."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import replace
from inspect import signature
from pathlib import Path
from typing import Optional

import typer

from ..cli_options import PRECISION, Precision, _shared_options, check_text
from ..errors import Qwen35Error

_SHARED = signature(_shared_options).parameters
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(name: str, text: str) -> int:
    """Bytes of a size such as ``4GiB``, ``512MB`` or ``1000000``."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", text.lower())
    if m is None or m.group(2) not in _UNITS:
        raise Qwen35Error(f"{name}: expected a size like 2GiB, 512MB or a number of bytes, got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: whatever it resolves to may be reachable from elsewhere


def serve(
    model: Optional[str] = _SHARED["model"].default,
    precision: Precision = PRECISION,
    chat_template: Optional[Path] = _SHARED["chat_template"].default,
    kv_bits: Optional[int] = _SHARED["kv_bits"].default,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="Port to listen on (0: any free port)."),
    api_key: Optional[str] = typer.Option(
        None, "--api-key", envvar="MLX_QWEN35_API_KEY", show_default=False,
        help="Require 'Authorization: Bearer KEY' on /v1 routes (or set MLX_QWEN35_API_KEY).",
    ),
    allow_public: bool = typer.Option(
        False, "--allow-public", help="Listen on an address other than loopback without an API key."
    ),
    cache_memory: str = typer.Option(
        "2GiB", "--cache-memory", help="Memory for conversation prefixes kept for reuse (least recently used go)."
    ),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Requests that decode at once, as one batch."),
    queue_size: int = typer.Option(16, "--queue-size", min=0, help="Requests that may wait; more are answered 429."),
    max_body: str = typer.Option("32MiB", "--max-body", help="Largest request body; larger ones are answered 413."),
    allow_files: Optional[Path] = typer.Option(
        None, "--allow-files", exists=True, file_okay=False, show_default=False,
        help="Let image_url parts name local image files, only under this folder.",
    ),
):
    """Serve the model over an OpenAI-compatible HTTP API: POST /v1/chat/completions.

    Up to --batch-size requests decode at once, as one batch; the others wait
    in arrival order. Each conversation's cache is
    kept at its message boundaries, so a client that re-sends a growing
    conversation pays only for its new messages. Ctrl-C stops the server.
    """
    from ..cli import err, fail, note, plan_model, run_or_fail  # it imports this module: not at the top
    from ..model.cache import KV_BITS

    run_or_fail(check_text, "--api-key", api_key)
    if not is_loopback(host) and api_key is None and not allow_public:
        fail(f"--host {host}: not a loopback address; pass --api-key KEY, or --allow-public to serve without one")
    if kv_bits is not None and kv_bits not in KV_BITS:
        fail(f"--kv-bits: {kv_bits} is not one of {', '.join(map(str, KV_BITS))}")
    cache_bytes = run_or_fail(parse_size, "--cache-memory", cache_memory)
    body_bytes = run_or_fail(parse_size, "--max-body", max_body)

    from ..plan import DEFAULT_MODEL, load_plan
    from .app import Server, bind, make_app
    from .worker import Worker

    try:
        sock = bind(host, port)
    except OSError as e:
        fail(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})")
    p = plan_model(model, precision)
    # Batched decoding does not draft: the MTP head stays unloaded
    load = lambda: load_plan(replace(p, mtp=False), chat_template)  # noqa: E731 - runs on the worker's thread
    worker = Worker(load, queue_size=queue_size, cache_memory=cache_bytes, kv_bits=kv_bits, batch_size=batch_size)
    with err.status(f"loading {p.folder.name} ({p.precision})", spinner="dots"):
        run_or_fail(worker.start)
    model_id = model or DEFAULT_MODEL
    app = make_app(worker, model_id, api_key=api_key, max_body=body_bytes, allow_files=allow_files)
    bound = sock.getsockname()
    note(f"serving {model_id} at http://{bound[0]}:{bound[1]}/v1 (Ctrl-C stops)")
    _log_to_stderr()
    try:
        Server(app, worker).run(sockets=[sock])
    except KeyboardInterrupt:
        pass  # uvicorn raises the signal again once it has shut down
    finally:
        try:
            worker.stop()  # its job is cancelled: it ends at the next token, or the next message of a prefill
        except KeyboardInterrupt:
            fail("interrupted while the model was busy", 130)
    note("stopped")


def _log_to_stderr() -> None:
    """The one line per request, timed, on stderr."""
    import logging

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log = logging.getLogger("mlx_qwen35.server")
    log.setLevel(logging.INFO)
    log.addHandler(handler)
