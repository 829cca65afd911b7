"""Unrolled layers (TrainConfig.unroll_layers) compute the same loss and gradients as the
lax.scan over layers, with and without the chunked loss."""

import jax
import numpy as np
import pytest

from jaxturbo.models.init import init_params
from jaxturbo.train.step import TrainConfig, sft_loss
from tests.train.test_losses_chunked import _batch, _cfg


@pytest.mark.parametrize("chunk", [0, 12])
def test_unrolled_equals_scan(chunk):
    cfg = _cfg(tied=True)
    params = init_params(cfg, jax.random.key(2))
    batch = _batch()

    def value(unroll: bool):
        tc = TrainConfig(compute_dtype="float32", loss_chunk_tokens=chunk, unroll_layers=unroll)
        loss = sft_loss(cfg, tc)
        return jax.jit(jax.value_and_grad(lambda p: loss(p, batch)[0].value()))(params)

    (ls, gs), (lu, gu) = value(False), value(True)
    np.testing.assert_allclose(float(lu), float(ls), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(gs), jax.tree.leaves(gu)):
        np.testing.assert_allclose(
            np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6 * (float(np.abs(a).max()) + 1e-12)
        )


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_layer_remat_step_equals_plain_step_and_checkpoints_each_layer(remat):
    from jaxturbo.train.optimizer import OptimizerConfig, make_optimizer
    from jaxturbo.train.step import init_state, make_train_step

    cfg = _cfg(tied=False)
    batch = _batch()
    opt = make_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_steps=1, total_steps=10))

    def run(tc):
        step = make_train_step(cfg, tc, opt, donate=False)
        state = init_state(init_params(cfg, jax.random.key(3)), opt)
        return step, state, step(state, batch)

    base = TrainConfig(compute_dtype="float32", loss_chunk_tokens=12)
    _, _, (s0, m0) = run(base)
    step, state, (s1, m1) = run(
        TrainConfig(compute_dtype="float32", loss_chunk_tokens=12, remat=remat, remat_scope="layer")
    )
    np.testing.assert_allclose(float(m1["loss"]), float(m0["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m1["grad_norm"]), float(m0["grad_norm"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s0.params), jax.tree.leaves(s1.params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
    # the checkpoint sits inside the layer loop, not around the whole loss
    assert _scan_body_has_remat(jax.make_jaxpr(step)(state, batch).jaxpr)
    loss_scope = make_train_step(
        cfg,
        TrainConfig(compute_dtype="float32", loss_chunk_tokens=12, remat=remat),
        opt,
        donate=False,
    )
    assert not _scan_body_has_remat(jax.make_jaxpr(loss_scope)(state, batch).jaxpr)


def _subjaxprs(eqn):
    for v in eqn.params.values():
        for x in v if isinstance(v, (tuple, list)) else (v,):
            if hasattr(x, "jaxpr") and hasattr(x.jaxpr, "eqns"):
                yield x.jaxpr  # ClosedJaxpr
            elif hasattr(x, "eqns"):
                yield x  # Jaxpr


def _scan_body_has_remat(jaxpr) -> bool:
    """Some scan in the program has a remat (checkpoint) equation directly in its body."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            body = eqn.params["jaxpr"].jaxpr
            if any(e.primitive.name in ("remat", "remat2", "checkpoint") for e in body.eqns):
                return True
        if any(_scan_body_has_remat(sub) for sub in _subjaxprs(eqn)):
            return True
    return False
