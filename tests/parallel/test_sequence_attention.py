"""Ulysses, ring and hybrid attention on fake CPU devices equal the single-device reference.

Outputs and gradients (float32, <= 1e-5 relative) for SP 2/3/4/6/8, causal and not, packed
sequences, GQA 9/3 (SmolLM2) and 32/8 heads; causal ring/hybrid run in zigzag order.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from jaxturbo.parallel import sequence as S  # noqa: E402
from jaxturbo.parallel.mesh import make_mesh  # noqa: E402
from pallas_kernels import attention  # noqa: E402

TOL = 1e-5


def _inputs(b, t, h, k, d, packed, seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
    q, kk, v, ct = f(b, t, h, d), f(b, t, k, d), f(b, t, k, d), f(b, t, h, d)
    seg = None
    if packed:  # documents of random lengths, including some shorter than a device's block
        seg = jnp.asarray(np.sort(rng.integers(0, 5, size=(b, t)), axis=1), jnp.int32)
    return q, kk, v, ct, seg


def _rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a)))


def _check(
    mode,
    sp_size,
    heads,
    kv_heads,
    causal,
    packed,
    *,
    t=32,
    ulysses_size=None,
    layout="zigzag",
    softcap=None,
    b=2,
    d=8,
    implementation="auto",
):
    mesh = make_mesh({"sequence": sp_size}, devices=jax.devices()[:sp_size])
    q, k, v, ct, seg = _inputs(b, t, heads, kv_heads, d, packed)
    sp = S.SequenceParallel(
        mode, ulysses_size=ulysses_size, layout=layout, implementation=implementation
    )
    u = S.validate(
        sp, sp_size=sp_size, num_heads=heads, num_kv_heads=kv_heads, seq_len=t, causal=causal
    )
    r = S.layout_ring_size(sp, sp_size=sp_size, ulysses_size=u, causal=causal)

    def ref(q, k, v):
        return attention(q, k, v, causal=causal, segment_ids=seg, softcap=softcap)

    def par(q, k, v):  # zigzag once on the way in, once on the way out
        z = lambda x: None if x is None else S.zigzag(x, r)
        out = S.sp_attention(
            z(q), z(k), z(v), mesh, sp, causal=causal, segment_ids=z(seg), softcap=softcap
        )
        return S.unzigzag(out, r)

    def out_and_grads(fn):
        out, vjp = jax.vjp(fn, q, k, v)
        return (out, *vjp(ct))

    want = jax.jit(lambda: out_and_grads(ref))()
    got = jax.jit(lambda: out_and_grads(par))()
    for name, w, g in zip(("out", "dq", "dk", "dv"), want, got):
        assert _rel(w, g) <= TOL, (name, _rel(w, g))


@pytest.mark.parametrize(
    "sp_size,heads,kv_heads,causal,packed",
    [
        (2, 32, 8, True, False),
        (4, 32, 8, False, True),
        (8, 32, 8, True, True),
        (3, 9, 3, True, True),  # SmolLM2's heads: Ulysses needs a divisor of 9
        (4, 8, 2, True, True),  # 4 does not divide 2 KV heads: each KV head repeated twice
    ],
)
def test_ulysses(sp_size, heads, kv_heads, causal, packed):
    _check("ulysses", sp_size, heads, kv_heads, causal, packed, t=24 if sp_size == 3 else 32)


@pytest.mark.parametrize(
    "sp_size,heads,kv_heads,causal,packed,layout",
    [
        (2, 9, 3, False, False, "zigzag"),
        (4, 9, 3, True, True, "zigzag"),
        (8, 32, 8, True, False, "zigzag"),
        (8, 9, 3, False, True, "zigzag"),
        (4, 32, 8, True, True, "contiguous"),  # fully masked blocks skipped by lax.cond
    ],
)
def test_ring(sp_size, heads, kv_heads, causal, packed, layout):
    _check("ring", sp_size, heads, kv_heads, causal, packed, layout=layout)


def test_ring_softcap():
    _check("ring", 4, 8, 2, True, False, softcap=5.0)


def test_ring_mosaic_tpu_kernels(monkeypatch):
    """Ring attention through the Mosaic TPU forward and backward kernels (TPU interpret mode:
    slow, so the smallest case with every block kind: the causal diagonal, zigzag's lower and
    upper halves, packed documents' key segments) against the single-device reference."""
    from pallas_kernels.flash_attention import mosaic_tpu

    ran = []

    def spy(name, kernel):
        def run(call, *args, **kw):  # the kernels take the call's description
            ran.append((name, call.q.shape[1], call.k.shape[1], call.causal))
            return kernel(call, *args, **kw)

        return run

    for name in ("flash_attention", "flash_attention_backward"):
        monkeypatch.setattr(mosaic_tpu, name, spy(name, getattr(mosaic_tpu, name)))
    _check("ring", 2, 2, 1, True, True, t=16, b=1, implementation="mosaic_tpu")
    # (query rows, key rows, causal) per block kind: diagonal, lower half, upper half
    for name in ("flash_attention", "flash_attention_backward"):
        assert {r[1:] for r in ran if r[0] == name} == {
            (8, 8, True),
            (8, 4, False),
            (4, 8, False),
        }, ran


@pytest.mark.parametrize(
    "sp_size,ulysses_size,heads,kv_heads,causal,packed,t",
    [
        (8, 2, 32, 8, True, True, 32),  # 2-way Ulysses x 4-way ring
        (6, 3, 9, 3, True, True, 24),  # 9 heads on 6 devices: Ulysses 3 x ring 2
        (4, 2, 32, 8, False, True, 32),
    ],
)
def test_hybrid(sp_size, ulysses_size, heads, kv_heads, causal, packed, t):
    _check("hybrid", sp_size, heads, kv_heads, causal, packed, t=t, ulysses_size=ulysses_size)
