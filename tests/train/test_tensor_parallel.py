"""The train step on meshes with tensor > 1 equals the single-device step (8 fake CPU devices).

Tiny random Llama with 8 query / 4 KV heads (tensor 2 and 4 divide both), packed rows of three
documents with per-segment positions, padding and masked targets, float32.  One step each;
the optimizer records the gradient it is given (`_RECORD`), so the loss and every gradient
leaf are compared with the one-device step's directly (not through an Adam update).

Meshes, the combinations the shipped presets use, scaled to at most 8 devices:
  tensor=2               h100x2
  tensor=4               h100x4, tpu-v5p-8
  data=2,tensor=4        data x tensor
  fsdp=2,tensor=4        tpu-v5p-64's fsdp 8 x tensor 4 (and tpu-v6e-256's fsdp x tensor)
  sequence=2,tensor=4    Ulysses over the sequence with each tensor device's 2 heads split
                         further (and ring, in one case)
with the unchunked and the chunked (vocab-parallel, blockwise) loss, gradient accumulation,
layer remat, QKV biases and tied embeddings spread over the cases.  Each case is a compile of
seconds, so the residual modes are paired with the meshes rather than crossed with them: the
mode changes only the layer loop's step function and where it sums over the tensor axis, not how
the other axes split the batch, sequence or parameters.  Standard runs tensor=2, fsdp x tensor
(chunked, and with custom losses) and sequence x tensor by Ulysses; Ladder runs tensor=4
(chunked), data x tensor (accumulation, layer remat), fsdp x tensor (Qwen2-like, chunked) and
sequence x tensor by ring.
"""

import dataclasses
import os
from typing import Any, NamedTuple

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import AbstractMesh  # noqa: E402

from jaxturbo.errors import UserError  # noqa: E402
from jaxturbo.models.config import ModelConfig  # noqa: E402
from jaxturbo.models.init import init_params  # noqa: E402
from jaxturbo.parallel.axes import AXES  # noqa: E402
from jaxturbo.parallel.mesh import make_mesh  # noqa: E402
from jaxturbo.parallel.sequence import model_layout  # noqa: E402
from jaxturbo.train import sharding as shd  # noqa: E402
from jaxturbo.train.losses import cross_entropy  # noqa: E402
from jaxturbo.train.step import TrainConfig, init_state, make_train_step, tensor_parallel_logits  # noqa: E402

CFG = ModelConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=8,
)
# Qwen2-like: q/k/v biases ([L, out]: only the tensor dimension is free, so fsdp splits it
# too, as ("tensor", "fsdp")) and the LM head tied to the embedding
QWEN = dataclasses.replace(CFG, model_type="qwen2", attention_bias=True, tie_word_embeddings=True)
B, T = 4, 16
F32 = TrainConfig(compute_dtype="float32")


class _Grads(NamedTuple):
    g: Any


# the "optimizer" keeps the (normalised) gradient it is given and leaves the params alone
_RECORD = optax.GradientTransformation(
    lambda p: _Grads(jax.tree.map(jnp.zeros_like, p)),
    lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), _Grads(g)),
)


def _batch(seed: int = 0) -> dict[str, np.ndarray]:
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


def _mesh(spec: str):
    n = int(np.prod([int(p.split("=")[1]) for p in spec.split(",")]))
    return make_mesh(spec, devices=jax.devices()[:n])


def _step(cfg, train, mesh=None, sp="none", loss_fn=None):
    """(loss, gradients as numpy, state) of one step from the same initial parameters."""
    params = init_params(cfg, jax.random.key(0), std=0.2)
    state = init_state(params, _RECORD, mesh=mesh)
    step = make_train_step(
        cfg, train, _RECORD, mesh=mesh, params=params, sequence_parallel=sp, loss_fn=loss_fn
    )
    ring = None if sp == "none" else model_layout(sp, cfg, mesh, batch=B, seq_len=T)[2]
    state, m = step(state, shd.put_batch(_batch(), mesh, sequence_ring=ring))
    return float(m["loss"]), jax.device_get(state.opt_state.g), state


@pytest.fixture(scope="module")
def reference():
    """The one-device step of each model, standard and ladder residual."""
    return {
        (name, mode): _step(dataclasses.replace(cfg, residual_mode=mode), F32)
        for name, cfg in (("llama", CFG), ("qwen", QWEN))
        for mode in ("standard", "ladder")
        if name == "llama" or mode == "ladder"
    }


def _assert_same(ref, got, tol=2e-6):
    assert got[0] == pytest.approx(ref[0], rel=1e-6, abs=1e-6)
    flat_r, flat_g = jax.tree_util.tree_flatten_with_path(ref[1])[0], jax.tree.leaves(got[1])
    for (path, r), g in zip(flat_r, flat_g):
        scale = float(np.max(np.abs(r)))
        assert scale > 0, path  # every parameter gets a gradient
        np.testing.assert_allclose(
            np.asarray(g), r, atol=tol * scale, rtol=0, err_msg=jax.tree_util.keystr(path)
        )


CASES = [  # (model, mesh, sequence parallel, TrainConfig changes, residual mode)
    ("llama", "tensor=2", "none", {}, "standard"),
    ("llama", "tensor=4", "none", {"loss_chunk_tokens": 24}, "ladder"),
    (
        "llama",
        "data=2,tensor=4",
        "none",
        {"grad_accum": 2, "remat": "full", "remat_scope": "layer"},
        "ladder",
    ),
    ("llama", "fsdp=2,tensor=4", "none", {"loss_chunk_tokens": 24}, "standard"),
    ("llama", "sequence=2,tensor=4", "ulysses", {}, "standard"),
]


@pytest.mark.parametrize("model, spec, sp, changes, mode", CASES)
def test_tensor_parallel_step_equals_single_device(reference, model, spec, sp, changes, mode):
    cfg = dataclasses.replace(CFG, residual_mode=mode)
    got = _step(cfg, dataclasses.replace(F32, **changes), _mesh(spec), sp)
    _assert_same(reference[(model, mode)], got)


def test_fsdp_tensor_layout_biases_tied_head_and_ring(reference):
    """fsdp x tensor with the Qwen2-like model (ladder, chunked), then sequence x tensor by ring
    attention (zigzag rows): same loss and gradients; the layout is the documented one."""
    cfg = dataclasses.replace(QWEN, residual_mode="ladder")
    got = _step(cfg, dataclasses.replace(F32, loss_chunk_tokens=24), _mesh("fsdp=2,tensor=4"))
    _assert_same(reference[("qwen", "ladder")], got)
    params = got[2].params
    specs = {
        k: tuple(params["layers"][k].sharding.spec)
        for k in (
            "self_attn.q_proj.weight",
            "self_attn.o_proj.weight",
            "self_attn.q_proj.bias",
            "input_layernorm.weight",
        )
    }
    assert specs == {
        "self_attn.q_proj.weight": (None, "tensor", "fsdp"),  # column: [L, out, D]
        "self_attn.o_proj.weight": (None, "fsdp", "tensor"),  # row: [L, D, in]
        "self_attn.q_proj.bias": (None, ("tensor", "fsdp")),  # [L, out]
        "input_layernorm.weight": (None, "fsdp"),
    }
    emb = params["model.embed_tokens.weight"]  # vocab over tensor, D over fsdp
    assert tuple(emb.sharding.spec) == ("tensor", "fsdp")
    assert emb.addressable_shards[0].data.shape == (64 // 4, 32 // 2)
    ring = _step(
        dataclasses.replace(CFG, residual_mode="ladder"),
        dataclasses.replace(F32, loss_chunk_tokens=24),
        _mesh("sequence=2,tensor=4"),
        "ring",
    )
    _assert_same(reference[("llama", "ladder")], ring)


def test_custom_loss_on_a_tensor_mesh(reference):
    """A custom loss_fn (as RL's) on fsdp x tensor: with the plain global forward (XLA
    partitions it from the parameter layout) and with `tensor_parallel_logits` (explicit
    collectives, logits left vocab-sharded) the step equals the one-device one."""
    mesh = _mesh("fsdp=2,tensor=4")
    tp_logits = tensor_parallel_logits(CFG, F32, mesh)

    def plain(p, b):
        from jaxturbo.models.transformer import forward

        logits, _ = forward(
            p, CFG, b["tokens"], positions=b["positions"], segment_ids=b["segment_ids"]
        )
        return cross_entropy(logits, b["targets"], b["weights"], segment_ids=b["segment_ids"]), {}

    def explicit(p, b):
        logits = tp_logits(p, b)
        return cross_entropy(logits, b["targets"], b["weights"], segment_ids=b["segment_ids"]), {}

    for loss_fn in (plain, explicit):
        _assert_same(reference[("llama", "standard")], _step(CFG, F32, mesh, loss_fn=loss_fn))


def test_impossible_combinations_name_the_valid_sizes():
    mesh = _mesh("data=2,tensor=4")
    params = init_params(CFG, jax.random.key(0))
    # 4 KV heads: tensor 8 would replicate them, which training cannot (copies drift apart)
    with pytest.raises(
        UserError,
        match=r"training with tensor axis 8: it does not divide the 4 "
        r"KV heads .* choose a tensor size from \{1, 2, 4\}",
    ):
        make_train_step(CFG, F32, _RECORD, mesh=_mesh("tensor=8"), params=params)
    odd = dataclasses.replace(CFG, num_attention_heads=6, num_key_value_heads=2)
    with pytest.raises(
        UserError,
        match=r"training with tensor axis 4 does not divide 6 query "
        r"heads; choose a tensor size from \{1, 2\}",
    ):
        make_train_step(odd, F32, _RECORD, mesh=mesh, params=init_params(odd, jax.random.key(0)))
    # Ulysses splits each tensor device's heads: 8 heads over tensor 4 leave 2 a device, which
    # sequence 4 does not divide (it divides the 8 heads of tensor 1); the mesh's shape is all
    # the check needs, so an abstract mesh stands for 16 devices
    mesh16 = AbstractMesh(tuple({"sequence": 4, "tensor": 4}.get(a, 1) for a in AXES), AXES)
    with pytest.raises(
        UserError,
        match=r"Ulysses over sequence=4 with tensor=4: each tensor "
        r"device holds 2 of the 8 query heads, which 4 does not "
        r"divide; choose sequence from \[2\] with tensor=4",
    ):
        model_layout("ulysses", CFG, mesh16, batch=B, seq_len=T)
    model_layout("ring", CFG, mesh16, batch=B, seq_len=T)  # ring has no head limit
    with pytest.raises(UserError, match=r"tensor=4 must divide the 8 query and 2 KV heads"):
        model_layout(
            "ring", dataclasses.replace(CFG, num_key_value_heads=2), mesh16, batch=B, seq_len=T
        )
