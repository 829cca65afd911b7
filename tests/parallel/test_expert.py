"""Expert parallelism (8 fake CPU devices): the dispatch and the MoE train step of every layout
equal the one-device ones.

A tiny random Qwen3-MoE (8 experts, top-2, 4 query / 2 KV heads), packed rows with padding and
masked targets, float32, router aux and z losses on.  One step with plain SGD (lr 1): the loss,
the router metrics and the parameters after the step (p - grad, so every gradient) are compared
with the one-device step.  Layouts: expert = 2, 4, 8 (with data or fsdp on the other devices),
expert x fsdp x sequence (Ulysses), the padded and the (emulated) ragged exchange, and capacity
mode with a capacity no pair exceeds (the cpu-8-moe preset, expert 4 x sequence 2, takes a LoRA
step equal to the one-device one in tests/train/test_lora.py).  The dispatch alone is checked against
`sorted_dispatch` (dropless) and against the per-device `sorted_dispatch` with the same capacity
(dropping)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jaxturbo.errors import UserError  # noqa: E402
from jaxturbo.models.config import MoEConfig  # noqa: E402
from jaxturbo.models.init import init_params  # noqa: E402
from jaxturbo.models.moe import ExpertWeights, route, sorted_dispatch  # noqa: E402
from jaxturbo.models.shapes import shape  # noqa: E402
from jaxturbo.parallel.expert import expert_parallel_dispatch, ragged_all_to_all_reference  # noqa: E402
from jaxturbo.parallel.mesh import make_mesh  # noqa: E402
from jaxturbo.parallel.sequence import model_layout  # noqa: E402
from jaxturbo.train import sharding as shd  # noqa: E402
from jaxturbo.train.step import TrainConfig, init_state, make_train_step  # noqa: E402

E, K = 8, 2
CFG = shape(
    "tiny-moe",
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    moe=MoEConfig(
        num_experts=E,
        num_experts_per_tok=K,
        moe_intermediate_size=16,
        norm_topk_prob=True,
        router_aux_loss_coef=0.1,
        router_z_loss_coef=0.01,
    ),
)
SGD = optax.sgd(1.0)
TRAIN = TrainConfig(compute_dtype="float32")
B, T = 8, 16
ROWS = P(("data", "fsdp", "expert"))


def make_batch(seed: int = 0) -> dict[str, np.ndarray]:
    """Rows of two documents, row r ending in r % 3 padding tokens, ~30% masked targets."""
    rs = np.random.RandomState(seed)
    seg = np.zeros((B, T), np.int32)
    pos = np.zeros((B, T), np.int32)
    for r in range(B):
        cut = rs.randint(3, T - 5)
        for s, (a, e) in enumerate([(0, cut), (cut, T - r % 3)]):
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


def _step(mesh=None, mode: str = "none", train: TrainConfig = TRAIN):
    params = init_params(CFG, jax.random.key(0), std=0.3)
    state = init_state(params, SGD, mesh=mesh)
    step = make_train_step(CFG, train, SGD, mesh=mesh, params=state.params, sequence_parallel=mode)
    ring = None if mode == "none" else model_layout(mode, CFG, mesh, batch=B, seq_len=T)[2]
    new, m = step(state, shd.put_batch(make_batch(), mesh, sequence_ring=ring))
    return jax.device_get(params), jax.device_get(new.params), jax.device_get(m)


@pytest.fixture(scope="module")
def reference():
    return _step()


def _assert_same(ref, got):
    p0, p1, m = ref
    _, q1, n = got
    assert m["router_aux_loss"] > 0.5 and m["router_z_loss"] > 0  # the losses are in play
    for k in ("loss", "router_loss", "router_aux_loss", "router_z_loss", "grad_norm"):
        np.testing.assert_allclose(n[k], m[k], rtol=2e-5, err_msg=k)
    assert n["dropped_fraction"] == 0.0
    for name in (
        "mlp.gate.weight",
        "mlp.experts.gate_proj.weight",
        "mlp.experts.down_proj.weight",
        "self_attn.q_proj.weight",
    ):
        g_ref = p0["layers"][name] - p1["layers"][name]
        assert np.abs(g_ref).max() > 1e-4, name
        np.testing.assert_allclose(
            p0["layers"][name] - q1["layers"][name], g_ref, atol=2e-6, rtol=2e-4, err_msg=name
        )
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        np.testing.assert_allclose(q1[name], p1[name], atol=2e-6, err_msg=name)


@pytest.mark.parametrize(
    "spec,mode,train",
    # each case is a compile: the expert sizes, the other axes, the exchange and capacity mode
    # are spread over the cases rather than crossed (the exchange and the capacity act inside
    # each device's dispatch, whatever splits the rows or the sequence around it)
    [
        ("expert=8", "none", TRAIN),
        (
            "expert=4,fsdp=2",
            "none",
            TrainConfig(compute_dtype="float32", moe_exchange="ragged_reference"),
        ),
        # capacity mode, at E/k times the mean load: C = N pairs, which no expert can exceed
        (
            "expert=2,data=4",
            "none",
            TrainConfig(compute_dtype="float32", moe_capacity_factor=E / K),
        ),
        ("expert=2,fsdp=2,sequence=2", "ulysses", TRAIN),
    ],
)
def test_expert_parallel_step_equals_one_device(reference, spec, mode, train):
    _assert_same(reference, _step(make_mesh(spec), mode, train))


def test_capacity_drops_are_counted_and_change_the_loss(reference):
    _, _, m = reference
    got = _step(
        make_mesh("expert=4,data=2"),
        "none",
        TrainConfig(compute_dtype="float32", moe_capacity_factor=0.5),
    )[2]
    # 2 tokens a device (of 16 per layer): capacity ceil(0.5 * 2 * 2 / 8) = 1 pair per expert
    assert 0.1 < got["dropped_fraction"] < 0.9
    assert abs(got["loss"] - m["loss"]) > 1e-4


def _layer(n: int, d: int = 16, f: int = 24):
    ks = jax.random.split(jax.random.key(3), 5)
    w = ExpertWeights(
        *(jax.random.normal(k, s) * 0.3 for k, s in zip(ks, ((E, f, d), (E, f, d), (E, d, f))))
    )
    x = jax.random.normal(ks[3], (n, d))
    _, weights, experts, _ = route(x, jax.random.normal(ks[4], (E, d)), K, True)
    return x, weights, experts, w


@pytest.mark.parametrize(
    "ep,exchange,capacity",
    [
        (2, "padded", None),
        (8, "padded", None),
        (4, "ragged_reference", None),
        (4, "padded", 2),
        (8, "ragged_reference", 1),
    ],
)
def test_dispatch_equals_one_device(ep, exchange, capacity):
    n = 6  # tokens per device
    x, weights, experts, w = _layer(8 * n)
    mesh = make_mesh(f"expert={ep},data={8 // ep}")
    dispatch = expert_parallel_dispatch(ep, exchange=exchange)

    def body(x, wt, ex, g, u, d):
        return dispatch(x, wt, ex, ExpertWeights(g, u, d), "xla", capacity=capacity)

    run = jax.jit(
        jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(ROWS,) * 3 + (P("expert"),) * 3,
            out_specs=ROWS,
            check_vma=False,
        )
    )
    got = np.asarray(run(x, weights, experts, w.gate, w.up, w.down))
    # capacity applies to each device's own pairs: the one-device dispatch shard by shard
    ref = np.concatenate(
        [
            sorted_dispatch(
                x[i : i + n], weights[i : i + n], experts[i : i + n], w, "xla", capacity=capacity
            )
            for i in range(0, 8 * n, n)
        ]
    )
    assert np.abs(ref).max() > 1e-2
    np.testing.assert_allclose(got, ref, atol=2e-5, rtol=1e-5)
    if capacity is not None:  # something was dropped: not the dropless result
        assert np.abs(ref - np.asarray(sorted_dispatch(x, weights, experts, w, "xla"))).max() > 1e-3


def test_ragged_reference_has_ragged_all_to_all_semantics():
    """The docstring example of jax.lax.ragged_all_to_all on 2 devices: slices land at the
    sender-chosen offsets of the receiver's output."""
    mesh = make_mesh("expert=2,data=4")

    def body(op, in_off, send, out_off, recv):
        out = jnp.full((6,), -1.0)
        return ragged_all_to_all_reference(
            op[0], out, in_off[0], send[0], out_off[0], recv[0], axis_name="expert", max_slice=3
        )[None]

    op = jnp.array([[1.0, 2.0, 3.0, 4.0, 0.0], [5.0, 6.0, 7.0, 8.0, 9.0]])
    in_off, send = jnp.array([[0, 1], [0, 3]]), jnp.array([[1, 3], [3, 2]])
    out_off, recv = jnp.array([[0, 0], [1, 3]]), jnp.array([[1, 3], [3, 2]])
    spec = P("expert")
    got = jax.jit(
        jax.shard_map(body, mesh=mesh, in_specs=(spec,) * 5, out_specs=spec, check_vma=False)
    )(op, in_off, send, out_off, recv)
    # device 0 keeps [1] at 0 and gets device 1's [5, 6, 7] at 1; device 1 gets [2, 3, 4] at 0
    # and keeps its own [8, 9] at 3
    np.testing.assert_array_equal(np.asarray(got), [[1, 5, 6, 7, -1, -1], [2, 3, 4, 8, 9, -1]])


def test_expert_axis_must_divide_the_experts():
    params = init_params(
        CFG.replace(moe=MoEConfig(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=16)),
        jax.random.key(0),
    )
    with pytest.raises(
        UserError,
        match=r"expert axis 4 does not divide the 6 experts; choose "
        r"an expert size from \[1, 2, 3, 6\]",
    ):
        make_train_step(
            CFG.replace(
                moe=MoEConfig(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=16)
            ),
            TRAIN,
            SGD,
            mesh=make_mesh("expert=4,data=2"),
            params=params,
        )
    with pytest.raises(UserError, match="expert exchange 'fast'"):
        TrainConfig(moe_exchange="fast").validate()


def test_moe_presets_and_a_tensor_axis():
    """The MoE presets carry the expert axis and pass the training checks of a model whose
    experts they divide; a tensor axis is refused naming the axes an MoE model splits over."""
    from jaxturbo.parallel.mesh import parse_mesh_spec
    from jaxturbo.train.sharding import check_training_mesh

    assert parse_mesh_spec("cpu-8-moe") == {
        "data": 1,
        "fsdp": 1,
        "expert": 4,
        "sequence": 2,
        "tensor": 1,
    }
    assert parse_mesh_spec("h100x8-moe")["expert"] == 8
    check_training_mesh(make_mesh("cpu-8-moe"), "ulysses", CFG)
    want = (
        r"tensor parallelism \(tensor=2\) of a qwen3_moe \(mixture-of-experts\) model is not "
        r"implemented; such a model trains split over the expert, data, fsdp and sequence "
        r"axes \(expert parallelism: e.g. expert=2 with tensor=1; the expert size must "
        r"divide its 8 experts\)"
    )
    with pytest.raises(UserError, match=want):
        make_train_step(
            CFG,
            TRAIN,
            SGD,
            mesh=make_mesh("tensor=2,expert=4"),
            params=init_params(CFG, jax.random.key(0)),
        )
    # placing the state first (init_state) fails as clearly, before any train step exists
    with pytest.raises(
        UserError, match="has no tensor-parallel layout .* put those devices on expert"
    ):
        init_state(init_params(CFG, jax.random.key(0)), SGD, mesh=make_mesh("tensor=2,data=4"))
    from jaxturbo.parallel import tensor

    with pytest.raises(
        UserError,
        match=r"inference of a qwen3_moe \(mixture-of-experts\) model "
        r"on a mesh of 8 devices is not implemented",
    ):
        tensor.check_mesh(CFG, make_mesh("data=8"))
    with pytest.raises(
        UserError, match=want.replace("expert=2", "expert=8").replace("tensor=2", "tensor=8")
    ):
        tensor.check_mesh(CFG, make_mesh("cpu-8"))


def test_batch_rows_must_split_over_the_expert_axis():
    with pytest.raises(
        UserError,
        match=r"a batch of 4 rows does not split over data x fsdp x "
        r"expert = 8 devices; use a multiple of 8 rows",
    ):
        shd.put_batch({k: v[:4] for k, v in make_batch().items()}, make_mesh("expert=8"))
