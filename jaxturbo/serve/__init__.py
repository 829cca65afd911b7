"""An OpenAI-compatible HTTP server on the inference engine (`jaxturbo serve`), and a load
generator for it (`jaxturbo bench serve`).

    server.py     Server, ServeConfig: uvicorn + the engine thread, start-up, graceful shutdown
    worker.py     EngineWorker: the one thread that steps the engine
    frontend.py   admission (429 / 503), routing engine outputs to requests, SSE streams
    app.py        the FastAPI routes
    protocol.py   request bodies -> engine jobs, with OpenAI's checks (400 / 404)
    responses.py  response, chunk, logprobs and usage bodies
    errors.py     APIError: OpenAI's error shape
    metrics.py    Prometheus metrics
    loadgen.py    Poisson-arrival streaming load generator and its latency report

docs/serving.md describes the API as served (fields supported, refused, ignored).
"""

from __future__ import annotations

import importlib
from typing import Any

# lazy (PEP 562): the load generator, a client, must not import the server's JAX and uvicorn
_EXPORTS = {"ServeConfig": "jaxturbo.serve.server", "Server": "jaxturbo.serve.server"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'jaxturbo.serve' has no attribute {name!r}")
