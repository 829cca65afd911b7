"""Mesh axis names, in one place, and the divisibility helpers every parallel mode's checks use.

Axis order is fixed: (data, fsdp, sequence, tensor), tensor innermost so that a tensor-parallel
group is neighbouring devices (NVLink peers on a GPU host, a torus ring on a TPU slice).
"""

from __future__ import annotations

DATA = "data"          # batch rows; parameters replicated
FSDP = "fsdp"          # batch rows; parameters (and optimizer state) sharded
SEQUENCE = "sequence"  # tokens of a row (Ulysses / ring attention)
TENSOR = "tensor"      # heads and FFN columns (Megatron tensor parallelism, Ladder-Residual)

AXES = (DATA, FSDP, SEQUENCE, TENSOR)
BATCH_AXES = (DATA, FSDP)  # the axes that split batch rows


def divisors(n: int) -> list[int]:
    """The positive divisors of n, ascending (what an axis size dividing n may be)."""
    return [d for d in range(1, n + 1) if n % d == 0]
