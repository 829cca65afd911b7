"""The train step: sharded (data x fsdp on 8 fake CPU devices) with gradient accumulation and
full remat equals the plain single-device step.  (Each compile costs seconds on CPU, so one
sharded run checks all three; bf16 compute is exercised by tests/train/test_checkpoint.py.)"""

import jax
import numpy as np
import pytest

from jaxturbo.errors import UserError
from jaxturbo.models.config import ModelConfig
from jaxturbo.models.init import init_params
from jaxturbo.parallel.mesh import make_mesh
from jaxturbo.train.optimizer import OptimizerConfig, lr_schedule, make_optimizer
from jaxturbo.train.sharding import put_batch
from jaxturbo.train.step import TrainConfig, init_state, make_train_step, sft_loss

CFG = ModelConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
)
OPT = make_optimizer(OptimizerConfig(learning_rate=1e-3, warmup_steps=1, total_steps=10))
STEPS = 2


def _batch(seed: int, b: int = 8, t: int = 16) -> dict[str, np.ndarray]:
    rs = np.random.RandomState(seed)
    seg = np.ones((b, t), np.int32)
    seg[:, t // 2 :] = 2  # two documents per row
    seg[::3, -3:] = 0  # and some padding
    pos = np.where(seg == 2, np.arange(t) - t // 2, np.arange(t)).astype(np.int32)
    w = (rs.rand(b, t) > 0.3).astype(np.float32) * (seg > 0)
    return dict(
        tokens=rs.randint(0, 64, (b, t)).astype(np.int32),
        targets=rs.randint(0, 64, (b, t)).astype(np.int32),
        weights=w,
        segment_ids=seg,
        positions=pos,
    )


def _run(train_cfg: TrainConfig, mesh=None):
    params = init_params(CFG, jax.random.key(0))
    state = init_state(params, OPT, mesh=mesh)
    step = make_train_step(CFG, train_cfg, OPT, mesh=mesh, params=params)
    losses = []
    for i in range(STEPS):
        state, m = step(state, put_batch(_batch(i), mesh))
        losses.append(float(m["loss"]))
        if i == 0:  # a host copy: the next step donates the state
            after_first = jax.device_get(state.params)
    return state, losses, after_first


@pytest.fixture(scope="module")
def reference():
    return _run(TrainConfig(compute_dtype="float32"))


def _assert_same(a, b, tol=1e-5):
    # Adam normalises each update, so last-bit differences of near-zero gradients (summation
    # order across devices) show up as ~lr * 1e-3 in the params: hence an absolute tolerance
    (sa, la, _), (sb, lb, _) = a, b
    np.testing.assert_allclose(la, lb, rtol=tol)
    for x, y in zip(jax.tree.leaves(sa.params), jax.tree.leaves(sb.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=tol)
    assert int(sa.step) == int(sb.step) == STEPS


def test_sharded_accumulated_remat_step_equals_single_device(reference):
    mesh = make_mesh("data=2,fsdp=4")
    got = _run(TrainConfig(compute_dtype="float32", grad_accum=2, remat="full"), mesh=mesh)
    _assert_same(reference, got)
    # parameters and Adam moments really are split over fsdp
    w = got[0].params["layers"]["mlp.up_proj.weight"]
    assert w.sharding.spec[1] == "fsdp"
    assert w.addressable_shards[0].data.shape == (2, 16, 32)
    mu = [x for x in jax.tree.leaves(got[0].opt_state) if x.shape == w.shape]
    assert mu and all(x.sharding.spec == w.sharding.spec for x in mu)
    # and the step trains: on the batch it was given, the loss after the update is lower than
    # before it (same batch, same starting point; the step's "loss" is the pre-update one)
    loss = sft_loss(CFG, TrainConfig(compute_dtype="float32"))
    after = float(jax.jit(lambda p, b: loss(p, b)[0].value())(reference[2], _batch(0)))
    assert after < reference[1][0] - 1e-4, (reference[1][0], after)


def test_schedule_and_validation():
    sched = lr_schedule(
        OptimizerConfig(learning_rate=1.0, warmup_steps=4, total_steps=12, min_lr_ratio=0.1)
    )
    assert float(sched(0)) == pytest.approx(0.25)
    assert float(sched(4)) == pytest.approx(1.0)
    assert float(sched(12)) == pytest.approx(0.1)
    # warm-up is linear from peak / 4: step 2 is .25 + .75 * 2 / 4 = .625; then a cosine over
    # the 8 remaining steps: step 6 is .1 + .9 * (1 + cos(pi / 4)) / 2 = .868198 (a linear decay
    # would give .775), step 8 (the middle) .55
    assert float(sched(2)) == pytest.approx(0.625)
    assert float(sched(6)) == pytest.approx(0.868198, abs=1e-6)
    assert float(sched(8)) == pytest.approx(0.55)
    with pytest.raises(UserError, match="warmup_steps=20"):
        lr_schedule(OptimizerConfig(warmup_steps=20, total_steps=10))
    with pytest.raises(UserError, match="remat policy"):
        make_train_step(CFG, TrainConfig(remat="some"), OPT)
    # tensor parallelism trains (tests/train/test_tensor_parallel.py) where the model splits:
    # 4 query / 2 KV heads do not split 8 ways, the message names the sizes that do
    with pytest.raises(
        UserError,
        match=r"training with tensor axis 8 does not divide 4 query "
        r"heads; choose a tensor size from \{1, 2\}",
    ):
        make_train_step(
            CFG,
            TrainConfig(),
            OPT,
            mesh=make_mesh("tensor=8"),
            params=init_params(CFG, jax.random.key(0)),
        )
