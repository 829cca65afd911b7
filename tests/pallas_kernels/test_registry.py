"""`pallas_kernels.registry`: which backend runs a call and why.  A made-up op pins the rules
("auto" in order with each skip's reason, logged once per distinct reason and kept in CHOICES;
an explicit backend that refuses names its reason and the backends that would take the call;
"pallas"; interpret mode off the platform); then the real ops: every one is registered, ends
with XLA, and on this CPU "auto" runs XLA and says why; on a Hopper GPU attention's "auto" and
"pallas" take the Mosaic GPU kernel where it covers the call.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import pytest

import pallas_kernels
from pallas_kernels import api, registry
from pallas_kernels.flash_attention.api import ATTENTION, ATTENTION_BACKWARD
from pallas_kernels.flash_attention.common import AttentionCall


@dataclasses.dataclass(frozen=True)
class Call:
    size: int = 1
    negative: bool = False


def _run(name):
    def run(call, *operands, config, interpret):
        return dict(name=name, operands=operands, config=config, interpret=interpret)

    return run


# a made-up op: a Hopper kernel that takes sizes up to 4, a GPU kernel that refuses negative
# calls, a TPU kernel, and XLA
TOY = registry.Op(
    "toy",
    (
        registry.Backend(
            "mosaic_gpu",
            _run("mosaic_gpu"),
            platform="gpu",
            hopper=True,
            pallas=True,
            refuses=lambda c: f"size {c.size} > 4" if c.size > 4 else None,
        ),
        registry.Backend(
            "cudnn",
            _run("cudnn"),
            platform="gpu",
            interpretable=False,
            auto_skips=lambda c: None if c.negative else "slower there",
        ),
        registry.Backend(
            "pallas_triton",
            _run("pallas_triton"),
            platform="gpu",
            pallas=True,
            refuses=lambda c: "negative" if c.negative else None,
        ),
        registry.Backend("mosaic_tpu", _run("mosaic_tpu"), platform="tpu", pallas=True),
        registry.Backend("xla", _run("xla")),
    ),
)


@pytest.fixture
def log(caplog):
    """An empty once-only record (other tests may have logged the same choices) and CHOICES
    (emptied in place: `api.CHOICES` is the same dict), caplog listening to the kernels'
    logger; both restored after."""
    saved = set(registry.LOGGED), dict(registry.CHOICES)
    registry.LOGGED.clear()
    registry.CHOICES.clear()
    caplog.set_level(logging.DEBUG, logger="pallas_kernels")
    yield caplog
    registry.LOGGED.clear()
    registry.LOGGED.update(saved[0])
    registry.CHOICES.clear()
    registry.CHOICES.update(saved[1])


def _on(monkeypatch, platform: str, hopper: bool = False) -> None:
    monkeypatch.setattr(registry, "platform", lambda: platform)
    monkeypatch.setattr(registry, "is_hopper", lambda: hopper)


def _lines(caplog, op: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(op + ":")]


def test_auto_takes_the_first_backend_that_runs_here_and_says_why(monkeypatch, log):
    _on(monkeypatch, "gpu", hopper=True)
    assert TOY(Call(size=2))["name"] == "mosaic_gpu"
    assert TOY.choose(Call(size=8)).name == "pallas_triton"  # cudnn: "auto" passes it over
    assert TOY.choose(Call(size=8, negative=True)).name == "cudnn"
    assert _lines(log, "toy") == [
        "toy: mosaic_gpu (on gpu)",
        "toy: pallas_triton (on gpu; mosaic_gpu: size 8 > 4; cudnn: slower there)",
        "toy: cudnn (on gpu; mosaic_gpu: size 8 > 4)",
    ]
    assert registry.CHOICES["toy"] == ("cudnn", "on gpu; mosaic_gpu: size 8 > 4")
    _on(monkeypatch, "cpu")
    assert TOY.choose(Call()).name == "xla"
    assert registry.CHOICES["toy"] == (
        "xla",
        "on cpu; mosaic_gpu: not on a GPU; cudnn: not on "
        "a GPU; pallas_triton: not on a GPU; mosaic_tpu: not on a "
        "TPU",
    )
    _on(monkeypatch, "gpu", hopper=False)
    assert TOY.choose(Call(size=2)).name == "pallas_triton"
    assert registry.CHOICES["toy"][1].startswith("on gpu; mosaic_gpu: not a Hopper GPU")


def test_each_distinct_choice_is_logged_once(monkeypatch, log):
    _on(monkeypatch, "tpu")
    for _ in range(3):
        assert TOY.choose(Call()).name == "mosaic_tpu"
    assert len(_lines(log, "toy")) == 1 and log.records[-1].levelno == logging.INFO
    registry.log_choice("toy", "xla", "a fallback", logging.WARNING)
    registry.log_choice("toy", "xla", "a fallback", logging.WARNING)
    assert _lines(log, "toy")[1:] == ["toy: xla (a fallback)"]
    assert log.records[-1].levelno == logging.WARNING
    assert registry.CHOICES["toy"] == ("xla", "a fallback")  # the latest choice


def test_an_explicit_backend_that_cannot_take_the_call_says_why_and_who_can(monkeypatch, log):
    _on(monkeypatch, "cpu")
    with pytest.raises(
        ValueError,
        match=r"^toy implementation='pallas_triton' cannot take this "
        r"call: negative; implementations that can: "
        r"mosaic_gpu, cudnn, mosaic_tpu, xla$",
    ):
        TOY(Call(negative=True), implementation="pallas_triton")
    with pytest.raises(
        ValueError,
        match=r"'nope' is unknown; choose one of \('auto', "
        r"'pallas', 'mosaic_gpu', 'cudnn', 'pallas_triton', "
        r"'mosaic_tpu', 'xla'\)",
    ):
        TOY(Call(), implementation="nope")
    # an explicit backend runs off its platform (interpret mode), recorded at DEBUG
    got = TOY(Call(size=2), 7, implementation="mosaic_gpu", config="cfg")
    assert got == dict(name="mosaic_gpu", operands=(7,), config="cfg", interpret=True)
    assert registry.CHOICES["toy"] == ("mosaic_gpu", "asked for 'mosaic_gpu'")
    assert log.records[-1].levelno == logging.DEBUG
    assert TOY(Call(), implementation="xla", interpret=False)["interpret"] is False


def test_pallas_is_the_platforms_kernel(monkeypatch, log):
    for platform, hopper, call, want in [
        ("tpu", False, Call(), "mosaic_tpu"),
        ("gpu", True, Call(size=2), "mosaic_gpu"),
        ("gpu", True, Call(size=8), "pallas_triton"),
        ("gpu", False, Call(size=2), "pallas_triton"),
        ("cpu", False, Call(), "pallas_triton"),
    ]:
        _on(monkeypatch, platform, hopper)
        assert TOY.choose(call, "pallas").name == want, (platform, hopper, call)
    with pytest.raises(ValueError, match="'pallas_triton' cannot take this call: negative"):
        TOY.choose(Call(negative=True), "pallas")


def test_interpret_defaults_to_true_off_the_kernels_platform(monkeypatch):
    _on(monkeypatch, "cpu")
    assert registry.interpret_default("pallas_triton") and registry.interpret_default("mosaic_tpu")
    assert TOY.backend("cudnn").unavailable() == "not on a GPU"  # no interpret mode
    assert TOY.backend("pallas_triton").unavailable() is None
    _on(monkeypatch, "gpu")
    assert not registry.interpret_default("pallas_triton")
    assert registry.interpret_default("mosaic_tpu")
    assert TOY.backend("cudnn").unavailable() is None


def test_register_refuses_a_second_list_for_one_op():
    with pytest.raises(ValueError, match="'attention' is registered already"):
        registry.register(registry.Op("attention", TOY.backends))
    with pytest.raises(ValueError, match="distinct names"):
        registry.register(registry.Op("toy2", TOY.backends[:1] * 2))


# ---- the real ops ----------------------------------------------------------------------------


def test_every_public_op_is_registered_and_ends_with_xla():
    assert set(registry.REGISTRY) == {
        "attention",
        "attention_backward",
        "decode_attention",
        "decode_attention_append",
        "mla_decode_attention",
        "ragged_paged_attention",
        "ragged_paged_mla_attention",
        "gmm",
        "tgmm",
        "gmv",
    }
    for name, op in registry.REGISTRY.items():
        assert op.names[-1] == "xla" and op.backends[-1].platform is None, name
        assert getattr(pallas_kernels, name) is getattr(api, name)  # exported


def _trace(fn, *shapes) -> None:
    """Dispatch fn on float32 arrays of `shapes` under a fresh jit trace (the choice is made,
    and logged, while tracing; nothing runs)."""
    jax.jit(lambda *a: fn(*a)).trace(*(jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes))


def test_auto_logs_each_choice_once(monkeypatch, log):
    _on(monkeypatch, "cpu")  # (what this machine is; on a GPU host too)
    b, h, s, r, dr = 2, 3, 40, 160, 32
    for _ in range(2):
        _trace(
            lambda ql, qr, c, kr: api.mla_decode_attention(
                ql, qr, c, kr, jnp.array([5, 2]), scale=0.1
            ),
            (b, h, r),
            (b, h, dr),
            (b, s, r),
            (b, s, dr),
        )
    why = "on cpu; pallas_triton: not on a GPU; mosaic_tpu: not on a TPU"
    assert _lines(log, "mla_decode_attention") == [f"mla_decode_attention: xla ({why})"]
    assert registry.CHOICES["mla_decode_attention"] == ("xla", why)
    assert api.CHOICES is registry.CHOICES  # what benchmarks read
    for _ in range(2):
        _trace(lambda q: api.attention(q, q, q, causal=True), (2, 5, 4, 8))
        _trace(lambda q: api.decode_attention(q[:, 0], q, q, jnp.array([5, 2])), (2, 5, 4, 8))
    assert _lines(log, "attention") == [
        "attention: xla (on cpu; mosaic_gpu: not on a GPU; cudnn: not on a GPU; pallas_triton: "
        "not on a GPU; mosaic_tpu: not on a TPU)"
    ]
    assert _lines(log, "decode_attention") == [f"decode_attention: xla ({why})"]


def test_attention_on_a_hopper_gpu_picks_mosaic_gpu_where_it_covers_the_call(monkeypatch, log):
    """Dispatch only (the kernels are checked by the conformance tests): on a Hopper GPU
    "auto" and "pallas" take the Mosaic GPU kernel where it covers the call, else what covers
    it; elsewhere on a GPU cuDNN, and Pallas-Triton for what cuDNN lacks or "auto" leaves."""
    sd = jax.ShapeDtypeStruct
    q, k = sd((1, 8, 2, 64), jnp.bfloat16), sd((1, 8, 1, 64), jnp.bfloat16)
    seg = jnp.zeros((1, 8), jnp.int32)
    calls = dict(
        plain=AttentionCall(q, k, k),
        packed=AttentionCall(q, k, k, segment_ids=seg),
        lse=AttentionCall(q, k, k, return_lse=True),
        fp32=AttentionCall(
            sd(q.shape, jnp.float32), sd(k.shape, jnp.float32), sd(k.shape, jnp.float32)
        ),
    )
    for hopper, want in [
        (
            True,
            dict(
                plain="mosaic_gpu", packed="pallas_triton", lse="mosaic_gpu", fp32="pallas_triton"
            ),
        ),
        (
            False,
            dict(plain="cudnn", packed="pallas_triton", lse="pallas_triton", fp32="pallas_triton"),
        ),
    ]:
        _on(monkeypatch, "gpu", hopper)
        assert {n: ATTENTION.choose(c).name for n, c in calls.items()} == want, hopper
        assert ATTENTION.choose(calls["plain"], "pallas").name == (
            "mosaic_gpu" if hopper else "pallas_triton"
        )
        # the backward: cuDNN where it covers the call; ours only when asked for
        assert ATTENTION_BACKWARD.choose(calls["plain"]).name == "cudnn"
        assert ATTENTION_BACKWARD.choose(calls["packed"]).name == "pallas_triton"
        assert ATTENTION_BACKWARD.choose(calls["plain"], "pallas").name == (
            "mosaic_gpu" if hopper else "pallas_triton"
        )
    assert (
        "attention: pallas_triton (on gpu; mosaic_gpu: not a Hopper GPU; cudnn: cuDNN takes "
        "bf16/fp16 inputs, got float32/float32/float32)"
    ) in _lines(log, "attention")
    big = sd((1, 8, 2, 256), jnp.bfloat16)  # head_dim 256 does not fit shared memory
    assert "shared memory" in ATTENTION.backend("mosaic_gpu").refuses(AttentionCall(big, big, big))
