"""A training step with sequence parallelism equals the step without it (8 fake CPU devices).

Tiny random Llama (4 query / 2 KV heads), packed rows with per-segment positions and masked
targets, float32.  Two steps each, so the second loss also checks the first step's gradients
(through the update); the parameters after both steps are compared too.  Each distinct step is a
compile (seconds on CPU), so the cases pair the training-side paths instead of crossing them:
  ulysses  data=2 x sequence=4   (natural order; 4 heads / 4 devices, the 2 KV heads replicated)
  ring     fsdp=2 x sequence=4   (host-side zigzag over 4, params sharded over fsdp), with
                                 remat="full" (the backward reruns the ring's exchanges)
each unchunked and with the chunked loss.  A step is compiled once (without donation) and
shared: the chunked cases run the executable whose HLO they inspect, and their unchunked
comparison is the plain case's step.
Hybrid runs the same training code (its own mesh view lives inside `sp_forward_laid_out`); its
model forward is checked against the reference in test_sequence_model.py, and ran through this
test's step (equal losses) when it was written, before being dropped for time.
"""

import dataclasses
import os
import re

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from jaxturbo.errors import UserError  # noqa: E402
from jaxturbo.models.config import ModelConfig  # noqa: E402
from jaxturbo.models.init import init_params  # noqa: E402
from jaxturbo.parallel.mesh import make_mesh  # noqa: E402
from jaxturbo.parallel.sequence import model_layout  # noqa: E402
from jaxturbo.train import sharding as shd  # noqa: E402
from jaxturbo.train.optimizer import OptimizerConfig, make_optimizer  # noqa: E402
from jaxturbo.train.step import TrainConfig, init_state, make_train_step  # noqa: E402

CFG = ModelConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
)
OPT = make_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_steps=1, total_steps=10))
TRAIN = TrainConfig(compute_dtype="float32")
B, T, STEPS = 4, 32, 2
# Parameters after STEPS Adam steps: Adam divides by sqrt(v), so where a gradient is near zero a
# last-bit difference in the sharded reduction order moves that element's update by up to ~lr; a
# layout error moves whole rows by far more.  1% of the learning rate separates the two.
PARAM_ATOL = 1e-4


def _batch(seed: int) -> dict[str, np.ndarray]:
    """Rows of three documents (lengths vary by row), some padding, ~30% masked targets."""
    rs = np.random.RandomState(seed)
    seg = np.zeros((B, T), np.int32)
    pos = np.zeros((B, T), np.int32)
    for r in range(B):
        cuts = sorted(rs.choice(np.arange(3, T - 3), 2, replace=False))
        bounds = [0, *cuts, T - r]  # row r ends with r padding tokens
        for s, (a, e) in enumerate(zip(bounds[:-1], bounds[1:])):
            seg[r, a:e] = s + 1
            pos[r, a:e] = np.arange(e - a)
    w = (rs.rand(B, T) > 0.3).astype(np.float32) * (seg > 0)
    return dict(
        tokens=rs.randint(0, 64, (B, T)).astype(np.int32),
        targets=rs.randint(0, 64, (B, T)).astype(np.int32),
        weights=w,
        segment_ids=seg,
        positions=pos,
    )


def _run(mesh=None, step=None, ring=None):
    """STEPS steps of `step` (default: the plain one-device step) from the same parameters."""
    params = init_params(CFG, jax.random.key(0))
    state = init_state(params, OPT, mesh=mesh)
    if step is None:
        step = make_train_step(CFG, TRAIN, OPT, params=params)
    losses = []
    for i in range(STEPS):
        state, m = step(state, shd.put_batch(_batch(i), mesh, sequence_ring=ring))
        losses.append(float(m["loss"]))
    return state, losses


@pytest.fixture(scope="module")
def reference():
    return _run()


@pytest.fixture(scope="module")
def compiled():
    """(mesh, ring, compiled step) per (mesh, mode, TrainConfig), compiled once for the module."""
    cache = {}

    def get(mesh_spec: str, mode: str, train: TrainConfig):
        key = (mesh_spec, mode, train)
        if key not in cache:
            mesh = make_mesh(mesh_spec)
            params = init_params(CFG, jax.random.key(0))
            state = init_state(params, OPT, mesh=mesh)
            step = make_train_step(
                CFG, train, OPT, mesh=mesh, params=params, sequence_parallel=mode, donate=False
            )
            _, _, ring = model_layout(mode, CFG, mesh, batch=B, seq_len=T)
            batch = shd.put_batch(_batch(0), mesh, sequence_ring=ring)
            cache[key] = mesh, ring, step.lower(state, batch).compile()
        return cache[key]

    return get


def _sp_run(compiled, mesh_spec: str, mode: str, train: TrainConfig):
    mesh, ring, step = compiled(mesh_spec, mode, train)
    state, losses = _run(mesh, step=step, ring=ring)
    return state, losses, ring


REMAT = TrainConfig(compute_dtype="float32", remat="full")


@pytest.mark.parametrize(
    "mode,mesh_spec,train,ring",
    [
        ("ulysses", "data=2,sequence=4", TRAIN, 1),
        ("ring", "fsdp=2,sequence=4", REMAT, 4),
    ],
)
def test_sp_train_step_equals_plain_step(reference, compiled, mode, mesh_spec, train, ring):
    ref_state, ref_losses = reference
    state, losses, got_ring = _sp_run(compiled, mesh_spec, mode, train)
    assert got_ring == ring  # the batch really was zigzagged (ring, hybrid)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert losses[1] != losses[0]
    for a, b in zip(jax.tree.leaves(ref_state.params), jax.tree.leaves(state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=PARAM_ATOL)


# chunked cross-entropy on the sequence-split hidden states: each device's 8 positions per row
# are cut into blocks of chunk // (4 rows x 4 pieces) positions; vs the unchunked 1-device step
@pytest.mark.parametrize(
    "mode,mesh_spec,train",
    [
        # 4 blocks of 2
        ("ulysses", "data=2,sequence=4", dataclasses.replace(TRAIN, loss_chunk_tokens=32)),
        # 3 of 3, padded
        ("ring", "fsdp=2,sequence=4", dataclasses.replace(REMAT, loss_chunk_tokens=48)),
    ],
)
def test_sp_chunked_loss_train_step_equals_plain_step(reference, compiled, mode, mesh_spec, train):
    ref_state, ref_losses = reference
    state, losses, _ = _sp_run(compiled, mesh_spec, mode, train)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(ref_state.params), jax.tree.leaves(state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=PARAM_ATOL)
    # the blocks stay split over rows and sequence: the chunked step all-gathers no shape that
    # the unchunked SP step does not (parameters, ids); no hidden state or block is gathered
    unchunked = dataclasses.replace(train, loss_chunk_tokens=0)
    chunked_gathers = _all_gathers(compiled(mesh_spec, mode, train)[2])
    assert chunked_gathers <= _all_gathers(compiled(mesh_spec, mode, unchunked)[2])


def _all_gathers(step) -> set[str]:
    """Result shapes (without layouts) of the all-gathers in a compiled step."""
    return set(re.findall(r"= (\w+\[[\d,]*\])\S* all-gather\(", step.as_text()))


def test_zigzag_rows_keeps_each_token_with_its_target_weight_and_position():
    batch = _batch(0)
    z = shd.zigzag_rows(batch, 4)
    keys = sorted(batch)
    for r in range(B):  # the same (token, target, weight, segment, position) tuples per row
        assert sorted(zip(*(z[k][r] for k in keys))) == sorted(zip(*(batch[k][r] for k in keys)))
    # ring position 0 of 4 holds chunks 0 and 7 of 8 (zigzag), each T/8 tokens
    c = T // 8
    for k in keys:
        np.testing.assert_array_equal(
            z[k][:, : 2 * c], np.concatenate([batch[k][:, :c], batch[k][:, -c:]], 1)
        )


@pytest.mark.parametrize(
    "mesh_spec,mode,match",
    [
        (
            "data=2,sequence=4",
            "none",
            "sequence=4 but sequence_parallel is none; choose one of ulysses, ring, hybrid",
        ),
        ("data=8", "ring", "needs a mesh with a sequence axis > 1"),
    ],
)
def test_bad_mesh_and_mode_combinations_fail_before_compiling(mesh_spec, mode, match):
    with pytest.raises(UserError, match=match):
        shd.check_training_mesh(make_mesh(mesh_spec), mode)


def test_ulysses_head_limit_names_valid_sizes():
    # 4 query heads cannot split over 8 devices: the message names what would work
    with pytest.raises(
        UserError,
        match=r"does not divide 4 query heads; choose a Ulysses size "
        r"from \{1, 2, 4\}, or use mode 'ring'",
    ):
        model_layout("ulysses", CFG, make_mesh("sequence=8"), batch=B, seq_len=T)
