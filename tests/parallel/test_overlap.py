"""`psum_beside` and the ladder's "streams" overlap: the same values as the plain forward, and
the lowered program carries the annotations XLA's GPU scheduler acts on (checked in the
StableHLO, which every backend receives; only the GPU compiler turns them into streams)."""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import re  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jaxturbo.models.transformer import forward  # noqa: E402
from jaxturbo.parallel import tensor  # noqa: E402
from jaxturbo.parallel.overlap import psum_beside  # noqa: E402
from tests.parallel.test_tensor import (  # noqa: E402
    PROMPT, STEPS, TINY, _reference, _rel, prefill_decode, random_params, tp_mesh)


def test_psum_beside_values_and_annotations():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("t",))
    w = jnp.asarray(np.random.RandomState(0).randn(3, 8, 8), jnp.float32)
    x = jnp.asarray(np.random.RandomState(1).randn(4, 2, 8), jnp.float32)

    def body(x, w):
        red, out = psum_beside(x[0], "t", lambda a, w, i: jnp.tanh(a @ w[i]), x[0], w, 1)
        return (red + out)[None]

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("t"), P()), out_specs=P("t")))
    got = f(x, w)
    want = x.sum(0) + jnp.tanh(x @ w[1])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    text = f.lower(x, w).as_text()
    groups_ar = re.findall(r'all_reduce.*?_scheduling_group_id = "(\d+)"', text, re.S)
    call = re.search(r'func.call @compute_on.*?\{mhlo.frontend_attributes = \{([^}]*)\}', text)
    assert call, "fn was not lowered as a separate call"
    assert '_xla_stream_annotation = "1"' in call.group(1)
    gid = re.search(r'_scheduling_group_id = "(\d+)"', call.group(1))
    assert gid and groups_ar and gid.group(1) == groups_ar[0], (call.group(1), groups_ar)


@pytest.mark.parametrize("unroll", [True, False])
def test_ladder_streams_equals_single_device(unroll):
    params = random_params(TINY)
    tokens = jnp.asarray(np.random.RandomState(1).randint(0, 256, (2, PROMPT)), jnp.int32)
    lengths = jnp.asarray([PROMPT, PROMPT - 2], jnp.int32)
    cfg = TINY.replace(residual_mode="ladder")
    ref_pre, ref_dec = _reference(params, cfg, tokens, lengths)
    mesh = tp_mesh(4)
    sp = tensor.shard_params(params, cfg, mesh)
    fwd = tensor.TensorParallel(mesh, unroll=unroll, ladder_overlap="streams")
    heads = tensor.cache_kv_heads(cfg, 4)
    run = jax.jit(lambda p, t, n: prefill_decode(fwd, p, cfg, t, n, STEPS, heads))
    pre, dec = run(sp, tokens, lengths)
    valid = np.arange(PROMPT)[None, :] < np.asarray(lengths)[:, None]
    assert _rel(pre[valid], ref_pre[valid]) <= 1e-5
    assert _rel(dec, ref_dec) <= 1e-5
    # one stream call per ladder layer and per traced forward (prefill + decode step)
    text = run.lower(sp, tokens, lengths).as_text()
    assert text.count('_xla_stream_annotation = "1", inlineable') >= 2 * (1 if not unroll else 3)


def test_ladder_overlap_rejects_unknown():
    with pytest.raises(ValueError, match="ladder_overlap"):
        forward(random_params(TINY), TINY, jnp.zeros((1, 2), jnp.int32), ladder_overlap="fast")
