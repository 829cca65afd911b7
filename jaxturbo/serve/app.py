"""The HTTP routes (FastAPI): /v1/models, /v1/completions, /v1/chat/completions, /health,
/metrics.  Every error answers in OpenAI's JSON shape (`errors.APIError`), unknown routes too.

Handlers only parse, check and wait on asyncio futures / queues fed by the engine thread
(`frontend.Frontend`); nothing here blocks the event loop.  /v1 routes need the API key when the
server has one; /health and /metrics do not (probes and scrapers).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from jaxturbo.serve.errors import APIError
from jaxturbo.serve.frontend import ClientGone, Frontend
from jaxturbo.serve.metrics import CONTENT_TYPE
from jaxturbo.serve.protocol import parse_chat, parse_completion

log = logging.getLogger(__name__)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _error_response(front: Frontend, e: APIError) -> JSONResponse:
    front.metrics.errors.labels(str(e.status), str(e.code)).inc()
    headers = {"Retry-After": "1"} if e.status in (429, 503) else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    if not raw.strip():
        raise APIError(400, "the request body is empty; send a JSON object")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None


def _disconnect_watcher(request: Request):
    """An awaitable factory that returns once the client has disconnected."""

    async def wait() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    return wait


class _SSEResponse(StreamingResponse):
    """A stream that runs `on_close` however it ends: a client that disconnects before the
    first event leaves the body generator unstarted (its `finally` would never run)."""

    def __init__(self, content: Any, on_close: Any) -> None:
        super().__init__(content, media_type="text/event-stream", headers=SSE_HEADERS)
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def build_app(front: Frontend) -> FastAPI:
    """The ASGI app over a frontend (see the module docstring)."""
    app = FastAPI(title="jaxturbo serve", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return _error_response(front, e)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        msg = (
            f"no route {request.method} {request.url.path}"
            if e.status_code in (404, 405)
            else str(e.detail)
        )
        return _error_response(front, APIError(e.status_code, msg))

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return _error_response(front, APIError(500, f"internal error: {type(e).__name__}: {e}"))

    @app.get("/health")
    async def health() -> Response:
        front.check_accepting()
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(front.metrics.render(), media_type=CONTENT_TYPE)

    def model_card() -> dict[str, Any]:
        return {
            "id": front.limits.model_name,
            "object": "model",
            "created": created,
            "owned_by": "jaxturbo",
            "max_model_len": front.limits.max_model_len,
        }

    created = int(time.time())

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        front.authorize(request.headers.get("authorization"))
        return JSONResponse({"object": "list", "data": [model_card()]})

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request) -> Response:
        front.authorize(request.headers.get("authorization"))
        if model_id != front.limits.model_name:
            raise APIError(
                404,
                f"the model {model_id!r} does not exist; this server serves "
                f"{front.limits.model_name!r}",
                param="model",
                code="model_not_found",
            )
        return JSONResponse(model_card())

    async def generate(request: Request, kind: str) -> Response:
        front.authorize(request.headers.get("authorization"))
        front.check_accepting()
        body = await _json_body(request)
        if kind == "chat":
            job = parse_chat(body, front.limits, front.tokenizer, front.chat_stop_ids)
        else:
            job = parse_completion(body, front.limits, front.tokenizer)
        ar = await front.submit(job)
        if job.stream:
            return _SSEResponse(front.stream(ar), lambda: front.release(ar))
        try:
            return JSONResponse(await front.complete(ar, _disconnect_watcher(request)))
        except ClientGone:
            return Response(status_code=499)  # nobody reads it; nginx's "client closed request"

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate(request, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generate(request, "chat")

    return app
