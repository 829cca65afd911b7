"""The chunked (token-blocked) cross-entropy equals the full-logits path: loss and gradients
w.r.t. every parameter, float32, tied and untied heads, both normalisations, a token count
that the chunk size does not divide, masked tokens and packed segments."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxturbo.errors import UserError
from jaxturbo.models.config import ModelConfig
from jaxturbo.models.init import init_params
from jaxturbo.train import losses
from jaxturbo.train.step import REMAT_POLICIES, TrainConfig, sft_loss


def _cfg(tied: bool) -> ModelConfig:
    return ModelConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        tie_word_embeddings=tied,
    )


def _batch(b: int = 3, t: int = 11) -> dict[str, jax.Array]:
    rs = np.random.RandomState(0)
    seg = np.ones((b, t), np.int32)
    seg[:, 6:] = 2  # two documents per row
    seg[1, -3:] = 0  # padding
    pos = np.where(seg == 2, np.arange(t) - 6, np.arange(t)).astype(np.int32)
    w = (rs.rand(b, t) > 0.3).astype(np.float32) * (seg > 0)
    w[2, :6] = 0  # a fully masked document
    w[0, 1] = 2.5  # a non-unit weight
    return {
        k: jnp.asarray(v)
        for k, v in dict(
            tokens=rs.randint(0, 96, (b, t)),
            targets=rs.randint(0, 96, (b, t)),
            weights=w,
            segment_ids=seg,
            positions=pos,
        ).items()
    }


# 3 rows of 11 tokens; a block is chunk // 3 positions of every row.  Two cases (each compiles
# the model twice): the head's tying only adds the embedding's gradient outside the blocks, so it
# pairs with the single block; sequence normalisation sums each row over several blocks, so it
# takes the padded multi-block case.  Blocks that divide the rows exactly: test_sequence_train.
@pytest.mark.parametrize(
    "tied,normalize,chunk",
    [
        (True, "token", 64),  # one block of 11
        (False, "sequence", 12),  # 3 of 4, last padded
    ],
)
def test_chunked_loss_and_grads_equal_unchunked(tied, normalize, chunk):
    cfg = _cfg(tied)
    params = init_params(cfg, jax.random.key(1))
    batch = _batch()
    full = sft_loss(cfg, TrainConfig(compute_dtype="float32", normalize=normalize))
    blocked = sft_loss(
        cfg, TrainConfig(compute_dtype="float32", normalize=normalize, loss_chunk_tokens=chunk)
    )

    def value(fn):
        return jax.jit(jax.value_and_grad(lambda p: fn(p, batch)[0].value()))(params)

    (lf, gf), (lc, gc) = value(full), value(blocked)
    np.testing.assert_allclose(float(lc), float(lf), rtol=1e-6)
    names = jax.tree_util.tree_flatten_with_path(gf)[0]
    for (path, a), b in zip(names, jax.tree.leaves(gc)):
        scale = float(jnp.max(jnp.abs(a))) + 1e-12
        np.testing.assert_allclose(
            np.asarray(b),
            np.asarray(a),
            rtol=1e-5,
            atol=1e-6 * scale,
            err_msg=jax.tree_util.keystr(path),
        )


@pytest.mark.parametrize("remat", ["none", "dots", "full"])
def test_chunked_cross_entropy_direct_and_under_remat(remat):
    rs = np.random.RandomState(2)
    h = jnp.asarray(rs.randn(2, 5, 8), jnp.float32)
    w = jnp.asarray(rs.randn(13, 8), jnp.float32)
    y = jnp.asarray(rs.randint(0, 13, (2, 5)), jnp.int32)
    wt = jnp.asarray(rs.rand(2, 5) * (rs.rand(2, 5) > 0.2), jnp.float32)

    def full(h, w):
        return losses.cross_entropy(jnp.einsum("btd,vd->btv", h, w), y, wt).value()

    def blocked(h, w):
        # 3 blocks of 2 positions, the last padded
        return losses.chunked_cross_entropy(h, w, y, wt, chunk_tokens=4).value()

    want = jax.value_and_grad(full, argnums=(0, 1))(h, w)
    policy = REMAT_POLICIES[remat]
    fn = blocked if policy is None else jax.checkpoint(blocked, policy=policy)
    got = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(h, w)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
    # the forward already computed the gradients: no remat policy reruns the LM-head matmuls
    # (3 per block: logits, d hidden, d head)
    assert str(jax.make_jaxpr(jax.grad(fn))(h, w)).count("dot_general") == 3


def test_chunked_loss_rejects_bad_settings():
    with pytest.raises(UserError):
        TrainConfig(loss_chunk_tokens=-1).validate()
    with pytest.raises(ValueError, match="seq_shards"):  # pieces must split the rows evenly
        h, y = jnp.zeros((2, 6, 4)), jnp.zeros((2, 6), jnp.int32)
        losses.chunked_cross_entropy(
            h, jnp.zeros((5, 4)), y, jnp.ones((2, 6)), chunk_tokens=4, seq_shards=4
        )


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (fake CPU) devices")
def test_chunked_sharded_accumulated_step_equals_unchunked_single_device():
    # blocks run along the sequence, so the rows stay split over data x fsdp inside the scan
    from jaxturbo.parallel.mesh import make_mesh
    from jaxturbo.train.optimizer import OptimizerConfig, make_optimizer
    from jaxturbo.train.sharding import put_batch
    from jaxturbo.train.step import init_state, make_train_step

    cfg = _cfg(True)
    opt = make_optimizer(OptimizerConfig(learning_rate=1e-3, warmup_steps=1, total_steps=10))
    params = init_params(cfg, jax.random.key(3))
    batch = {k: np.asarray(v) for k, v in _batch(b=16, t=11).items()}

    def run(tc, mesh=None):
        state = init_state(params, opt, mesh=mesh)
        step = make_train_step(cfg, tc, opt, mesh=mesh, params=params)
        state, m = step(state, put_batch(batch, mesh))
        return state.params, float(m["loss"])

    want = run(TrainConfig(compute_dtype="float32"))
    got = run(
        TrainConfig(compute_dtype="float32", grad_accum=2, remat="dots", loss_chunk_tokens=24),
        mesh=make_mesh("data=2,fsdp=4"),
    )
    assert got[1] == pytest.approx(want[1], rel=1e-6)
    for a, b in zip(jax.tree.leaves(want[0]), jax.tree.leaves(got[0])):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5)
