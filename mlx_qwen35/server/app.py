"""The HTTP side: routes, bearer auth, the body limit, OpenAI-style errors, server-sent events.

Every answer that is not a completion is OpenAI's error JSON: 400 for a bad
field, 401 without the API key, 404 for an unknown route or model, 405 for a
wrong method, 413 over the body limit, 429 when the queue is full (with
``Retry-After``). The model runs on the :class:`~mlx_qwen35.server.worker.Worker`
thread; a client that goes away cancels its job.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
import time
import uuid
from pathlib import Path
from typing import AsyncIterator, Optional

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..engine import GenerationResult
from ..stream import Piece
from .protocol import ApiError, Reply, parse_chat, parse_json, usage
from .worker import Failed, Job, QueueFull, Started, Worker

log = logging.getLogger("mlx_qwen35.server")
# A generation is cut short only for a client that has gone, or by the server stopping.
STOPPED = ApiError(503, "generation stopped: the server is shutting down")


def error_response(e: ApiError, headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def make_app(
    worker: Worker,
    model_id: str,
    *,
    api_key: Optional[str] = None,
    max_body: int = 32 << 20,
    allow_files: Optional[Path] = None,
) -> Starlette:
    """The Starlette app serving ``worker``'s model as ``model_id``."""
    created = int(time.time())

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key (send the header Authorization: Bearer KEY)",
                           code="invalid_api_key")

    async def read_body(request: Request) -> bytes:
        too_big = ApiError(413, f"request body: larger than the server's limit of {max_body} bytes (--max-body)")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > max_body:
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body:
                raise too_big
            chunks.append(chunk)
        return b"".join(chunks)

    def parse(body: bytes):
        return parse_chat(parse_json(body), model_id, allow_files)

    async def chat(request: Request) -> Response:
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        try:
            check_key(request)
            params = await run_in_threadpool(parse, await read_body(request))
            job = Job(rid, params, asyncio.get_running_loop())
            worker.submit(job)
        except ApiError as e:
            log.info("%s %d %s", rid, e.status, e.message)
            return error_response(e, {"WWW-Authenticate": "Bearer"} if e.status == 401 else None)
        except QueueFull as e:
            log.info("%s 429 queue full", rid)
            error = ApiError(429, f"the queue is full ({worker.waiting} requests waiting); retry later")
            return error_response(error, {"Retry-After": str(e.retry_after)})
        except ClientDisconnect:
            return Response(status_code=400)
        watcher = asyncio.create_task(cancel_on_disconnect(request, job))
        try:
            first = await job.events.get()
            if isinstance(first, Failed):
                return error_response(first.error)
            reply = Reply(rid, params.model)
            if params.stream:
                stream, watcher = sse(job, first, reply, watcher), None  # the stream owns the watcher now
                return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            async for event in events(job):
                if isinstance(event, Failed):
                    return error_response(event.error)
                if isinstance(event, Piece):
                    reply.add(event)
                elif event.finish_reason == "interrupted":
                    return error_response(STOPPED)
                else:
                    return JSONResponse(reply.completion(event, usage_of(first, event)))
        finally:
            if watcher is not None:
                watcher.cancel()
                job.cancel()

    async def sse(job: Job, first: Started, reply: Reply, watcher: asyncio.Task) -> AsyncIterator[str]:
        try:
            yield data(reply.chunk({"role": "assistant", "content": ""}))
            async for event in events(job):
                if isinstance(event, Failed):
                    yield data(event.error.body())
                elif isinstance(event, Piece):
                    delta = reply.add(event)
                    if delta is not None:
                        yield data(reply.chunk(delta))
                elif event.finish_reason == "interrupted":
                    yield data(STOPPED.body())
                else:
                    yield data(reply.chunk({}, reply.finish_reason(event)))
                    if job.params.include_usage:
                        yield data(reply.usage_chunk(usage_of(first, event)))
            yield "data: [DONE]\n\n"
        finally:
            watcher.cancel()
            job.cancel()

    async def models(request: Request) -> Response:
        check_key(request)
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def model(request: Request) -> Response:
        check_key(request)
        name = request.path_params["name"]
        if name != model_id:
            raise ApiError(404, f"model: {name!r} is not served here; this server serves {model_id!r}",
                           param="model", code="model_not_found")
        return JSONResponse(model_card())

    def model_card() -> dict:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "mlx_qwen35"}

    async def health(request: Request) -> Response:
        store = worker.store
        return JSONResponse({
            "status": "ok",
            "model": model_id,
            "running": len(worker.running),
            "waiting": worker.waiting,
            "cache": {"entries": len(store.entries), "bytes": store.nbytes, "budget": store.budget},
        })

    async def api_error(request: Request, e: ApiError) -> Response:
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return error_response(e, headers)

    async def http_error(request: Request, e: HTTPException) -> Response:
        if e.status_code == 404:
            message = f"{request.url.path}: no such route (try POST /v1/chat/completions)"
        elif e.status_code == 405:
            message = f"{request.method} {request.url.path}: method not allowed (allowed: {e.headers.get('Allow')})"
        else:
            message = e.detail
        return error_response(ApiError(e.status_code, message), e.headers)

    async def internal_error(request: Request, e: Exception) -> Response:
        return error_response(ApiError(500, f"internal error: {type(e).__name__}"))

    routes = [
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{name:path}", model, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ]
    handlers = {ApiError: api_error, HTTPException: http_error, Exception: internal_error}
    return Starlette(routes=routes, exception_handlers=handlers)


def usage_of(first: Started, result: GenerationResult) -> dict:
    return usage(first.prompt_tokens, first.cached_tokens, result.generation_tokens)


def data(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def events(job: Job) -> AsyncIterator:
    """The job's events after :class:`Started`, up to its result or failure."""
    while True:
        event = await job.events.get()
        yield event
        if isinstance(event, (Failed, GenerationResult)):
            return


async def cancel_on_disconnect(request: Request, job: Job) -> None:
    """Cancel ``job`` when the client goes away (the body is read: what comes next is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancel()


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: any free port); OSError if the address cannot be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)  # connections wait in the backlog until the server accepts them
    except OSError:
        sock.close()
        raise
    return sock


class Server(uvicorn.Server):
    """uvicorn serving the app; one log line per request comes from the worker, not an access log.

    On Ctrl-C it also cancels the worker's jobs, so that open streams end at once.
    """

    def __init__(self, app: Starlette, worker: Worker, **config):
        options = dict(log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=5)
        super().__init__(uvicorn.Config(app, **{**options, **config}))
        self.worker = worker

    def handle_exit(self, sig, frame) -> None:
        self.worker.cancel_all()
        super().handle_exit(sig, frame)
