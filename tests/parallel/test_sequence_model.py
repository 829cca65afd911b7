"""sp_forward: the model with its sequence split over 8 fake devices equals the unsharded model.

Tiny random Llama (4 query / 2 KV heads, 2 layers); packed rows with per-segment positions, so
RoPE positions and segment ids must travel with their tokens through the zigzag layout.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from jaxturbo.models.config import ModelConfig  # noqa: E402
from jaxturbo.models.transformer import forward  # noqa: E402
from jaxturbo.parallel import sequence as S  # noqa: E402
from jaxturbo.parallel.mesh import make_mesh  # noqa: E402

CFG = ModelConfig(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
)


def _params(cfg, seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(0.2 * rng.normal(size=s), jnp.float32)
    L, D, F, hd = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    H, K = cfg.num_attention_heads, cfg.num_key_value_heads
    return {
        "model.embed_tokens.weight": f(cfg.vocab_size, D),
        "model.norm.weight": 1 + f(D),
        "lm_head.weight": f(cfg.vocab_size, D),
        "layers": {
            "input_layernorm.weight": 1 + f(L, D),
            "post_attention_layernorm.weight": 1 + f(L, D),
            "self_attn.q_proj.weight": f(L, H * hd, D),
            "self_attn.k_proj.weight": f(L, K * hd, D),
            "self_attn.v_proj.weight": f(L, K * hd, D),
            "self_attn.o_proj.weight": f(L, D, H * hd),
            "mlp.gate_proj.weight": f(L, F, D),
            "mlp.up_proj.weight": f(L, F, D),
            "mlp.down_proj.weight": f(L, D, F),
        },
    }


def _packed_batch(b=2, t=32, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CFG.vocab_size, size=(b, t)).astype(np.int32)
    seg = np.sort(rng.integers(0, 4, size=(b, t)), axis=1).astype(np.int32)
    # positions restart at 0 at each segment start (per-document RoPE)
    pos = np.zeros_like(seg)
    for i in range(b):
        for j in range(1, t):
            pos[i, j] = 0 if seg[i, j] != seg[i, j - 1] else pos[i, j - 1] + 1
    return jnp.asarray(tokens), jnp.asarray(pos), jnp.asarray(seg)


@pytest.mark.parametrize(
    "mode,mesh_spec",
    [
        ("ulysses", {"sequence": 4, "fsdp": 2}),
        (S.SequenceParallel("hybrid", ulysses_size=2), {"sequence": 8}),
    ],
)
def test_sp_forward_matches_unsharded_logits(mode, mesh_spec):
    """(ring's logits are covered by the loss-and-gradient test below.)"""
    params = _params(CFG)
    tokens, pos, seg = _packed_batch()
    want, _ = jax.jit(lambda p: forward(p, CFG, tokens, positions=pos, segment_ids=seg))(params)
    mesh = make_mesh(mesh_spec)
    got = jax.jit(
        lambda p: S.sp_forward(p, CFG, tokens, mesh, mode, positions=pos, segment_ids=seg)
    )(params)
    assert float(jnp.max(jnp.abs(want - got)) / jnp.max(jnp.abs(want))) <= 1e-5


def test_loss_and_grads_with_ring_equal_unsharded():
    """The training loss (next-token cross entropy) and its parameter gradients under SP."""
    params = _params(CFG, seed=1)
    tokens, pos, seg = _packed_batch(seed=1)
    mesh = make_mesh({"sequence": 2, "data": 2}, devices=jax.devices()[:4])

    def loss(logits):
        lp = jax.nn.log_softmax(logits[:, :-1])
        return -jnp.mean(jnp.take_along_axis(lp, tokens[:, 1:, None], axis=-1))

    ref = jax.jit(
        jax.value_and_grad(
            lambda p: loss(forward(p, CFG, tokens, positions=pos, segment_ids=seg)[0])
        )
    )
    par = jax.jit(
        jax.value_and_grad(
            lambda p: loss(
                S.sp_forward(p, CFG, tokens, mesh, "ring", positions=pos, segment_ids=seg)
            )
        )
    )
    (l0, g0), (l1, g1) = ref(params), par(params)
    assert abs(float(l0 - l1)) <= 1e-5 * abs(float(l0))
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        assert float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a))) <= 1e-5
