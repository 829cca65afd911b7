"""Unrolled layers (TrainConfig.unroll_layers) compute the same loss and gradients as the
lax.scan over layers, with and without the chunked loss."""

import jax
import numpy as np
import pytest

from jaxturbo.train.init import init_params
from jaxturbo.train.step import TrainConfig, sft_loss
from tests.train.test_losses_chunked import _batch, _cfg


@pytest.mark.parametrize("chunk", [0, 12])
def test_unrolled_equals_scan(chunk):
    cfg = _cfg(tied=True)
    params = init_params(cfg, jax.random.key(2))
    batch = _batch()

    def value(unroll: bool):
        tc = TrainConfig(compute_dtype="float32", loss_chunk_tokens=chunk,
                         unroll_layers=unroll)
        loss = sft_loss(cfg, tc)
        return jax.jit(jax.value_and_grad(lambda p: loss(p, batch)[0].value()))(params)

    (ls, gs), (lu, gu) = value(False), value(True)
    np.testing.assert_allclose(float(lu), float(ls), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(gs), jax.tree.leaves(gu)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5,
                                   atol=1e-6 * (float(np.abs(a).max()) + 1e-12))
