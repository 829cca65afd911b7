"""Sequence-parallel validation (errors before compilation) and the zigzag layout helpers."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from jaxturbo.errors import UserError  # noqa: E402
from jaxturbo.parallel import sequence as S  # noqa: E402
from jaxturbo.parallel.mesh import make_mesh  # noqa: E402


def test_zigzag_places_chunk_pairs_and_round_trips():
    x = jnp.arange(16)[None]
    z = S.zigzag(x, 4)  # 8 chunks of 2; ring position r holds chunks r and 7 - r
    per_device = np.asarray(z).reshape(4, 4)
    for r in range(4):
        assert per_device[r].tolist() == [2 * r, 2 * r + 1, 2 * (7 - r), 2 * (7 - r) + 1]
    assert np.array_equal(np.asarray(S.unzigzag(z, 4)), np.asarray(x))
    assert S.zigzag(x, 1) is x


def _qkv(t, h, k, d=4):
    return (jnp.zeros((1, t, h, d)), jnp.zeros((1, t, k, d)), jnp.zeros((1, t, k, d)))


@pytest.mark.parametrize(
    "mode,kw,shape,match",
    [
        ("ulysses", {}, (16, 9, 3), r"choose a Ulysses size from \{1, 3, 9\}"),
        ("ring", {}, (24, 8, 2), r"not divisible by 16 .*e\.g\. 32"),
        ("hybrid", {"ulysses_size": 3}, (32, 12, 4), r"choose one of \[1, 2, 4\]"),
        ("stripes", {}, (32, 8, 2), r"choose one of none, ulysses, ring, hybrid"),
        ("ring", {"layout": "striped"}, (32, 8, 2), r"choose one of zigzag, contiguous"),
        ("ring", {"ulysses_size": 2}, (32, 8, 2), r"applies to mode 'hybrid' only"),
    ],
)
def test_invalid_configurations_raise_before_tracing(mode, kw, shape, match):
    mesh = make_mesh({"sequence": 8})
    t, h, k = shape
    sp = S.SequenceParallel(mode, **kw)
    with pytest.raises(UserError, match=match):
        S.sp_attention(*_qkv(t, h, k), mesh, sp, causal=True)


def test_ring_rejects_sliding_window_and_names_ulysses():
    mesh = make_mesh({"sequence": 4}, devices=jax.devices()[:4])
    with pytest.raises(UserError, match="use mode 'ulysses'"):
        S.sp_attention(
            *_qkv(32, 8, 2), mesh, S.SequenceParallel("ring"), causal=True, sliding_window=8
        )


def test_hybrid_default_ulysses_size_is_largest_common_divisor():
    assert S.resolve_ulysses_size(S.SequenceParallel("hybrid"), 8, 12) == 4
    assert S.resolve_ulysses_size(S.SequenceParallel("hybrid"), 8, 9) == 1


def test_hybrid_mesh_keeps_device_order():
    mesh = make_mesh({"sequence": 8})
    hm = S.hybrid_mesh(mesh, 2)
    assert hm.axis_names == (
        "data",
        "fsdp",
        "expert",
        "sequence_ring",
        "sequence_ulysses",
        "tensor",
    )
    assert [d.id for d in hm.devices.flat] == [d.id for d in mesh.devices.flat]
