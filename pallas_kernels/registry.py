"""Which backend runs a call: per op, an ordered list of backends, each saying why it cannot take
a call (or None when it can).

`implementation` of every public function names a backend or asks the registry:
  "auto"    the first backend in the op's order that runs natively here (its platform, Hopper
            for the Mosaic GPU kernels) and takes the call; the choice, and why each backend
            before it was passed over, is logged once per distinct reason (`log_choice`) and
            kept in `CHOICES` for benchmarks to report the path that ran;
  "pallas"  the first Pallas kernel native here that takes the call; without a GPU or TPU the
            Pallas-Triton kernel, in interpret mode (slow: for tests);
  a name    that backend, off its platform in interpret mode; if it cannot take the call,
            ValueError names the reason and the implementations that can.

Backends take one call description (a frozen dataclass per op family, e.g.
`flash_attention.common.AttentionCall`) and the implementation's `config` and `interpret`.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from collections.abc import Callable
from typing import Any

import jax

logger = logging.getLogger("pallas_kernels")
# (op, implementation, reason) already logged: each is logged once per process
LOGGED: set[tuple[str, str, str]] = set()
# op -> (implementation, reason) of its latest dispatch (at trace time, as the logging is)
CHOICES: dict[str, tuple[str, str]] = {}

Reason = Callable[[Any], "str | None"]


def log_choice(op: str, impl: str, reason: str, level: int = logging.INFO) -> str:
    """Record that `op` runs `impl` because of `reason` and log it, once per distinct
    (op, impl, reason) in the process ("mla_decode_attention: xla (on cpu; ...)").
    level: WARNING for a fallback from a faster path the platform has.  Returns impl."""
    CHOICES[op] = (impl, reason)
    if (op, impl, reason) not in LOGGED:
        LOGGED.add((op, impl, reason))
        logger.log(level, "%s: %s (%s)", op, impl, reason)
    return impl


def platform() -> str:
    """The default device's platform: "gpu", "tpu" or "cpu"."""
    return jax.devices()[0].platform


def is_hopper() -> bool:
    """A compute-capability 9.x GPU: wgmma and TMA, what the Mosaic GPU kernels are written to."""
    dev = jax.devices()[0]
    return dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")).startswith("9")


def interpret_default(impl: str) -> bool:
    """Kernels run in interpret mode where their platform is absent (Mosaic TPU: a TPU; every
    other kernel: a GPU)."""
    return platform() != ("tpu" if impl == "mosaic_tpu" else "gpu")


def takes_all(call: Any) -> None:
    """The `refuses` of a backend that takes every call its op accepts."""
    return None


def kernel(module: str, fn: str) -> Callable[..., Any]:
    """A backend's run: `module`'s function fn(call, *operands, config=, interpret=), looked up
    when it runs (the module imported then: Mosaic GPU's imports are heavy, cuDNN's private)."""

    def run(call: Any, *operands: Any, config: Any, interpret: Any) -> Any:
        return getattr(importlib.import_module(module), fn)(
            call, *operands, config=config, interpret=interpret
        )

    return run


@dataclasses.dataclass(frozen=True)
class Backend:
    """One implementation of an op.

    run(call, *operands, config=, interpret=): the result.  platform: where it runs natively
    ("gpu", "tpu"; None: XLA, anywhere); hopper: natively only on a Hopper GPU.
    refuses(call): why it cannot take the call (a missing feature, a dtype), or None.
    auto_skips(call): why "auto" passes it over although it could run the call (slower there,
    or no gradient where the caller may need one), or None.
    interpretable: runs off its platform in interpret mode (cuDNN does not).
    pallas: a Pallas kernel, a candidate for implementation="pallas"."""

    name: str
    run: Callable[..., Any]
    platform: str | None = None
    refuses: Reason = takes_all
    auto_skips: Reason = takes_all
    hopper: bool = False
    interpretable: bool = True
    pallas: bool = False

    def not_native(self) -> str | None:
        """Why it does not run natively here, or None."""
        if self.platform is None:
            return None
        if platform() != self.platform:
            return f"not on a {self.platform.upper()}"
        if self.hopper and not is_hopper():
            return "not a Hopper GPU"
        return None

    def unavailable(self) -> str | None:
        """Why it cannot run here at all (no interpret mode off its platform), or None."""
        return None if self.interpretable else self.not_native()


@dataclasses.dataclass(frozen=True)
class Op:
    """An op's backends in "auto"'s order of preference (XLA last: it takes every call)."""

    name: str
    backends: tuple[Backend, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(b.name for b in self.backends)

    @property
    def implementations(self) -> tuple[str, ...]:
        """What `implementation` may be for this op."""
        pallas = ("pallas",) if any(b.pallas for b in self.backends) else ()
        return ("auto", *pallas, *self.names)

    def backend(self, name: str) -> Backend:
        for b in self.backends:
            if b.name == name:
                return b
        raise ValueError(
            f"{self.name} implementation {name!r} is unknown; choose one of {self.implementations}"
        )

    def takers(self, call: Any) -> list[str]:
        """The backends that take `call` (on some platform)."""
        return [b.name for b in self.backends if b.refuses(call) is None]

    def choose(self, call: Any, implementation: str = "auto") -> Backend:
        """The backend that runs `call` (module docstring), recorded in CHOICES and logged."""
        if implementation == "auto":
            return self._auto(call)
        if implementation == "pallas" and "pallas" in self.implementations:
            native = [
                b
                for b in self.backends
                if b.pallas and b.not_native() is None and b.refuses(call) is None
            ]
            b = native[0] if native else self.backend("pallas_triton")
        else:
            b = self.backend(implementation)
        why = b.refuses(call)
        if why is not None:
            raise ValueError(
                f"{self.name} implementation={b.name!r} cannot take this call: "
                f"{why}; implementations that can: {', '.join(self.takers(call))}"
            )
        log_choice(self.name, b.name, f"asked for {implementation!r}", logging.DEBUG)
        return b

    def _auto(self, call: Any) -> Backend:
        skipped = []
        for b in self.backends:
            why = b.not_native() or b.refuses(call) or b.auto_skips(call)
            if why is None:
                reason = f"on {platform()}" + "".join(f"; {n}: {w}" for n, w in skipped)
                log_choice(self.name, b.name, reason)
                return b
            skipped.append((b.name, why))
        raise ValueError(
            f"{self.name}: no implementation takes this call ("
            + "; ".join(f"{n}: {w}" for n, w in skipped)
            + ")"
        )

    def __call__(
        self,
        call: Any,
        *operands: Any,
        implementation: str = "auto",
        config: Any = None,
        interpret: Any = None,
    ) -> Any:
        """Run `call` (and `operands`, arrays the call description does not hold) on the
        chosen backend; `interpret` defaults to True off the backend's platform."""
        b = self.choose(call, implementation)
        if interpret is None:
            interpret = interpret_default(b.name)
        return b.run(call, *operands, config=config, interpret=interpret)


REGISTRY: dict[str, Op] = {}


def register(op: Op) -> Op:
    """Add `op` to REGISTRY (its name must be new: one backend list per op)."""
    if op.name in REGISTRY:
        raise ValueError(f"op {op.name!r} is registered already")
    if not op.backends or len(set(op.names)) != len(op.names):
        raise ValueError(f"op {op.name!r} needs backends with distinct names, got {op.names}")
    REGISTRY[op.name] = op
    return op
