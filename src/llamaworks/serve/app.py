"""The OpenAI-compatible HTTP API and the web chat page, as a FastAPI app factory.

`create_app(engine, model_name)` serves `GET /` (the chat page), `/health`, `/v1/models`,
`/metrics`, `POST /v1/chat/completions` and `/v1/completions` over a `ContinuousEngine` (whose
scheduler thread it starts). Every error is answered in OpenAI's shape and leaves the server
serving (and the connection open); a client that disconnects cancels its request, which frees its
cache rows. POST bodies must be JSON (415 otherwise) and `exposure.HostOriginGuard` refuses other
web sites, so a page in the user's browser cannot drive a local server.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import AsyncIterator, Collection
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from llamaworks.infer.continuous import ContinuousEngine, QueueFullError
from llamaworks.serve import responses as R
from llamaworks.serve.anthropic import MessagesJob, MessagesRequest, error_body, to_chat
from llamaworks.serve.audio import add_audio_routes
from llamaworks.serve.bridge import ClientGone, RequestTimeout, Submission
from llamaworks.serve.chat import ChatJob, CompletionJob
from llamaworks.serve.exposure import HostOriginGuard, allowed_hosts
from llamaworks.serve.metrics import Metrics
from llamaworks.serve.responses_api import ResponseJob, ResponsesRequest, ResponseStore
from llamaworks.serve.responses_api import to_chat as to_responses_chat
from llamaworks.serve.schemas import (
    APIError,
    ChatRequest,
    CompletionRequest,
    parse_json,
    validation_error,
)

STATIC = Path(__file__).resolve().parent / "static"
ENDPOINTS = ("/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions",
             "/v1/audio/transcriptions", "/v1/audio/translations", "/v1/audio/speech")


class _CountRequests:
    """Pure ASGI middleware counting responses per endpoint and status (it does not wrap
    `receive`, so streaming responses still notice disconnects)."""

    def __init__(self, app: Any, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def counting_send(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            path = scope["path"] if scope["path"] in ENDPOINTS else "other"
            self.metrics.request_done(path, status)


def _is_json(content_type: str) -> bool:
    media = content_type.split(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/")
                                           and media.endswith("+json"))


def create_app(engine: ContinuousEngine, model_name: str, api_key: str | None = None,
               max_body_bytes: int = 1 << 20, request_timeout: float = 600.0,
               default_max_tokens: int = 1024, retry_after: int = 1, host: str = "127.0.0.1",
               extra_hosts: Collection[str] = (), cors_origins: Collection[str] = (),
               reasoning_format: str = "auto", max_audio_bytes: int = 25 << 20
               ) -> FastAPI:
    """The app. `api_key`: require `Authorization: Bearer KEY` on /v1/*. `max_body_bytes`:
    larger bodies get 413. `request_timeout`: seconds before a request is cancelled.
    `default_max_tokens`: the chat budget when a request sets none (bounded by the context).
    `host`: the address it is bound to; with `extra_hosts`, the Host names it answers to
    (`exposure.allowed_hosts`). `cors_origins`: web origins allowed to call it from a browser.
    `max_audio_bytes`: the largest upload to /v1/audio/* (`serve.audio`; 413 above)."""
    engine.start()
    metrics = Metrics()
    app = FastAPI(title="llamaworks", docs_url=None, redoc_url=None, openapi_url=None)
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins),
                           allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(HostOriginGuard, hosts=allowed_hosts(host, extra_hosts),
                       cors_origins=cors_origins)
    app.add_middleware(_CountRequests, metrics=metrics)
    app.state.engine, app.state.metrics = engine, metrics

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        return await _api_error(_, APIError(400, str(e.errors()[:1])))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return await _api_error(_, APIError(e.status_code, str(e.detail), kind))

    @app.exception_handler(Exception)
    async def _crash(_: Request, e: Exception) -> JSONResponse:
        return await _api_error(_, APIError(500, f"internal error: {type(e).__name__}: {e}",
                                            "server_error"))

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        got = request.headers.get("authorization", "")
        key = got[7:] if got.startswith("Bearer ") else request.headers.get("x-api-key")
        if key is None or not hmac.compare_digest(key.encode(), api_key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY' "
                           "(or 'x-api-key: KEY') with the key the server was started with "
                           "(--api-key)",
                           "authentication_error", code="invalid_api_key")

    async def read_body(request: Request, model: type[BaseModel]) -> Any:
        authorize(request)
        too_big = APIError(413, f"the request body is larger than {max_body_bytes} bytes",
                           code="request_too_large")
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > max_body_bytes:
            raise too_big
        raw = bytearray()
        async for part in request.stream():
            raw += part
            if len(raw) > max_body_bytes:
                raise too_big
        ctype = request.headers.get("content-type", "")
        if not _is_json(ctype):  # what browsers send cross-site without asking (CORS)
            raise APIError(415, f"the body must be JSON, sent with 'Content-Type: "
                           f"application/json' (not {ctype or 'none'!r})",
                           code="unsupported_media_type")
        obj = parse_json(bytes(raw))
        try:
            body = model.model_validate(obj)
        except ValidationError as e:
            raise validation_error(e) from None
        if body.model != model_name:
            raise APIError(400, f"unknown model {body.model!r}; this server serves "
                           f"{model_name!r} (see GET /v1/models)", param="model",
                           code="model_not_found")
        return body

    def submit(job: ChatJob | CompletionJob) -> Submission:
        try:
            return Submission(engine, job.prompts, job.params)
        except QueueFullError as e:
            raise APIError(429, str(e), "rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(retry_after)}) from None
        except ValueError as e:  # more prompts than the whole queue holds
            raise APIError(400, str(e), param="prompt", code="invalid_value") from None

    async def answer(request: Request, job: ChatJob | CompletionJob) -> Any:
        sub = submit(job)
        start = time.monotonic()
        if job.stream:
            return StreamingResponse(stream(sub, job, start), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        watch = asyncio.create_task(sub.watch(request.receive))
        try:
            async for j, ev in sub.events(request_timeout):
                job.on_event(j, ev)
        except RequestTimeout as e:
            raise APIError(504, str(e), "timeout_error", code="timeout") from None
        except ClientGone:
            return JSONResponse({}, 499)
        finally:
            watch.cancel()
            if sub.open:
                sub.cancel()
        observe(sub, start)
        return job.response()

    def observe(sub: Submission, start: float) -> None:
        firsts = [r.first_token for r in sub.requests if r.first_token is not None]
        metrics.generation_done(time.monotonic() - start,
                                min(firsts) - start if firsts else None)

    async def stream(sub: Submission, job: ChatJob | CompletionJob,
                     start: float) -> AsyncIterator[str]:
        try:
            for c in job.first_chunks():
                yield R.sse(c)
            async for j, ev in sub.events(request_timeout):
                for c in job.on_event(j, ev):
                    yield R.sse(c)
            for c in job.last_chunks():
                yield R.sse(c)
            observe(sub, start)
        except RequestTimeout as e:
            yield R.sse(APIError(504, str(e), "timeout_error", code="timeout").body())
        finally:
            sub.cancel()  # a disconnect cancels this generator: free the rows now
        yield R.sse("[DONE]")

    store = ResponseStore()

    async def stream_events(sub: Submission, job: Any, start: float) -> AsyncIterator[str]:
        """A job's own server-sent events (the Messages and Responses APIs' framing)."""
        try:
            for e in job.first_events():
                yield e
            async for j, ev in sub.events(request_timeout):
                for e in job.on_event(j, ev):
                    yield e
            observe(sub, start)
        except RequestTimeout as e:
            yield job.timeout_event(str(e))
        finally:
            sub.cancel()  # a disconnect cancels this generator: free the rows now

    @app.post("/v1/responses")
    async def responses(request: Request) -> Any:
        """OpenAI's Responses API."""
        body = await read_body(request, ResponsesRequest)
        history = store.get(body.previous_response_id) if body.previous_response_id else []
        chat = to_responses_chat(body, history)
        job = ResponseJob(ChatJob(engine, chat, model_name, default_max_tokens,
                                  reasoning_format), body, store,
                          [m.to_render() for m in chat.messages])
        return await answer_translated(request, job)

    async def answer_translated(request: Request, job: Any) -> Any:
        """A job of another API's shape: answered whole, or streamed in its own events."""
        if not job.stream:
            return await answer(request, job)
        sub = submit(job)
        return StreamingResponse(stream_events(sub, job, time.monotonic()),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @app.post("/v1/messages")
    async def messages(request: Request) -> Any:
        """Anthropic's Messages API (errors in its own shape)."""
        try:
            body = await read_body(request, MessagesRequest)
            job = MessagesJob(ChatJob(engine, to_chat(body), model_name, default_max_tokens,
                                      reasoning_format), body)
            return await answer_translated(request, job)
        except APIError as e:
            return JSONResponse(error_body(e), e.status, headers=e.headers)

    add_audio_routes(app, authorize, max_audio_bytes)

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, "free_slots": engine.free_slots,
                "queue_depth": engine.queue_depth}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(engine),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model",
                                            "created": 0, "owned_by": "llamaworks",
                                            "max_model_len": engine.context}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body = await read_body(request, ChatRequest)
        return await answer(request, ChatJob(engine, body, model_name, default_max_tokens,
                                             reasoning_format))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await read_body(request, CompletionRequest)
        return await answer(request, CompletionJob(engine, body, model_name))

    return app
