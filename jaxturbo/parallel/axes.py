"""Mesh axis names, in one place, and the divisibility helpers every parallel mode's checks use.

Axis order is fixed: (data, fsdp, expert, sequence, tensor), tensor innermost so that a
tensor-parallel group is neighbouring devices (NVLink peers on a GPU host, a torus ring on a TPU
slice); the expert all-to-all then runs among the next-nearest devices.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

DATA = "data"  # batch rows; parameters replicated
FSDP = "fsdp"  # batch rows; parameters (and optimizer state) sharded
EXPERT = "expert"  # mixture-of-experts experts (expert parallelism); batch rows elsewhere
SEQUENCE = "sequence"  # tokens of a row (Ulysses / ring attention)
TENSOR = "tensor"  # heads and FFN columns (Megatron tensor parallelism, Ladder-Residual)

AXES = (DATA, FSDP, EXPERT, SEQUENCE, TENSOR)
# The axes that split batch rows.  `expert` is one of them: outside the expert layers it is a
# data axis (each expert-parallel device runs its own rows), and the expert layers exchange
# those rows' tokens by all-to-all (jaxturbo.parallel.expert).
BATCH_AXES = (DATA, FSDP, EXPERT)


def divisors(n: int) -> list[int]:
    """The positive divisors of n, ascending (what an axis size dividing n may be)."""
    return [d for d in range(1, n + 1) if n % d == 0]


def batch_devices(sizes: Mapping[str, int]) -> int:
    """How many row groups a batch splits into: the product of the BATCH_AXES sizes (`sizes`:
    a mesh's shape; absent axes count 1)."""
    return math.prod(sizes.get(a, 1) for a in BATCH_AXES)
