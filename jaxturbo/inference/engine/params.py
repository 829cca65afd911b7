"""Per-request generation settings of the engine (plain Python, no JAX).

`RequestParams` is what a caller passes to `Engine.add_request` / `Engine.generate`;
`RowSampling` is the part the model runner reads on device for one sample (stored as the
scheduler's opaque `Request.sampling`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from jaxturbo.errors import UserError

MAX_TOP_LOGPROBS = 20  # the most alternatives a step reports per token (a static shape)
SEED_MODULUS = 2**32  # seeds travel to the device as uint32


@dataclasses.dataclass(frozen=True)
class RequestParams:
    """How one request is generated.  Every bad value raises `UserError` naming it.

    max_tokens: most tokens to generate per sample.
    temperature: 0 = greedy (argmax); otherwise logits / temperature are sampled.
    top_k: keep the k most likely tokens (0: off).  top_p: nucleus mass (1.0: off).
    min_p: keep tokens with probability >= min_p * the top token's (0.0: off).
    seed: the random stream's seed (None: drawn by the engine); the stream is keyed by (seed,
        position of the sampled token), so a request samples the same tokens alone or batched.
        Sample i > 0 of n uses a seed derived from (seed, i).
    stop_token_ids: tokens that end a sample (included in its output).
    stop: strings that end a sample when they appear in its text (cut from the output; needs
        the engine's tokenizer).
    n: samples drawn from the prompt (they share its cached pages).
    logprobs: report the logprob of every generated token.
    top_logprobs: also report this many most likely alternatives per token (at most the
        engine's `max_top_logprobs`).
    ignore_eos: keep generating past the model's end-of-sequence tokens.
    priority: lower runs earlier (ties by arrival).
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    stop_token_ids: Sequence[int] = ()
    stop: Sequence[str] = ()
    n: int = 1
    logprobs: bool = False
    top_logprobs: int = 0
    ignore_eos: bool = False
    priority: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise UserError(f"max_tokens={self.max_tokens} must be an integer >= 1")
        if not self.temperature >= 0:
            raise UserError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise UserError(f"top_k={self.top_k} must be an integer >= 0 (0 = off)")
        if not 0.0 < self.top_p <= 1.0:
            raise UserError(f"top_p={self.top_p} must be in (0, 1] (1 = off)")
        if not 0.0 <= self.min_p <= 1.0:
            raise UserError(f"min_p={self.min_p} must be in [0, 1] (0 = off)")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise UserError(f"seed={self.seed} must be a non-negative integer or None")
        if not isinstance(self.n, int) or self.n < 1:
            raise UserError(f"n={self.n} must be an integer >= 1")
        if not isinstance(self.top_logprobs, int) or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise UserError(
                f"top_logprobs={self.top_logprobs} must be an integer in [0, {MAX_TOP_LOGPROBS}]"
            )
        if isinstance(self.stop, str):
            raise UserError(f"stop={self.stop!r} must be a list of strings, not one string")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise UserError(f"stop={list(self.stop)} must hold non-empty strings")
        # frozen: normalise the sequences to tuples once
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_sort(self) -> bool:
        """Whether drawing needs the sorted distribution (top-k or top-p on a sampled row)."""
        return not self.greedy and (self.top_k > 0 or self.top_p < 1.0)

    def row(self, seed: int, index: int = 0) -> RowSampling:
        """The device-side settings of sample `index` (seed: the request's resolved seed)."""
        if index:  # a different, reproducible stream per sample
            seed = (seed + index * 0x9E3779B1) % SEED_MODULUS
        return RowSampling(
            self.temperature, self.top_k, self.top_p, self.min_p, seed % SEED_MODULUS
        )


@dataclasses.dataclass(frozen=True)
class RowSampling:
    """What the model runner reads for one sample: the filters and the resolved seed."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int = 0

    @property
    def needs_sort(self) -> bool:
        return self.temperature > 0.0 and (self.top_k > 0 or self.top_p < 1.0)


GREEDY = RowSampling()
