"""Inference: static batched generation, sampling, sliding-window perplexity, the opt-in fused
decode weight layout, and the serving engine (`jaxturbo.inference.engine`).

The public names below are imported lazily (PEP 562), so that importing the engine's
host-side modules (plain Python) does not start JAX.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "GenerationResult": "jaxturbo.inference.generation",
    "generate": "jaxturbo.inference.generation",
    "SamplingParams": "jaxturbo.inference.sampling",
    "sample": "jaxturbo.inference.sampling",
    "PerplexityResult": "jaxturbo.inference.scoring",
    "perplexity": "jaxturbo.inference.scoring",
    "window_plan": "jaxturbo.inference.scoring",
    "Engine": "jaxturbo.inference.engine.engine",
    "EngineConfig": "jaxturbo.inference.engine.config",
    "RequestParams": "jaxturbo.inference.engine.params",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'jaxturbo.inference' has no attribute {name!r}")
