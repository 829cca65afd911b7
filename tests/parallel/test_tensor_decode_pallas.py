"""Tensor-parallel greedy decode with the Pallas-Triton decode kernel inside `shard_map`, as the
ladder benchmark runs it on GPUs: fused q/k/v and gate/up weights, and the one-kernel decode
step reading the new token's k and v at their head offsets in the fused projection's output
(interpret mode on fake CPU devices).  Greedy tokens and every step's logits equal the
one-device XLA run of the same (unfused) weights, standard and ladder, at TP 2 (KV heads split)
and TP 4 (KV heads replicated first).
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from jaxturbo.inference import fused  # noqa: E402
from jaxturbo.models.config import ModelConfig  # noqa: E402
from jaxturbo.models.transformer import forward, init_cache  # noqa: E402
from jaxturbo.parallel import tensor  # noqa: E402
from jaxturbo.parallel.mesh import make_mesh  # noqa: E402
from pallas_kernels.decode_attention import api as decode_api  # noqa: E402
from pallas_kernels.decode_attention import pallas_triton as decode_triton  # noqa: E402
from tests.parallel.test_tensor import random_params  # noqa: E402

# 8 query / 2 KV heads; head_dim 16: the fused append kernel takes power-of-two head dims only
TINY = ModelConfig(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=32,
)
PROMPT, STEPS = 5, 3


def greedy(fwd, params, cfg, tokens, lengths, kv_heads, decode_impl):
    """XLA prefill of right-padded prompts, then STEPS greedy decode steps with `decode_impl`
    (a scan: the step compiles once).  Returns (tokens [STEPS + 1, B], logits [STEPS, B, V])."""
    b, t = tokens.shape
    cache = init_cache(cfg, b, t + STEPS + 1, kv_heads=kv_heads)
    seg = (jnp.arange(t)[None] < lengths[:, None]).astype(jnp.int32)
    logits, cache = fwd(
        params, cfg, tokens, segment_ids=seg, cache=cache, lengths=lengths, attn_impl="xla"
    )
    first = jnp.argmax(logits[jnp.arange(b), lengths - 1], -1).astype(jnp.int32)

    def step(carry, _):
        cache, tok = carry
        lg, cache = fwd(params, cfg, tok[:, None], cache=cache, attn_impl=decode_impl)
        nxt = jnp.argmax(lg[:, 0], -1).astype(jnp.int32)
        return (cache, nxt), (nxt, lg[:, 0])

    _, (toks, lgs) = jax.lax.scan(step, (cache, first), None, length=STEPS)
    return jnp.concatenate([first[None], toks]), lgs


@pytest.fixture(scope="module")
def prompts():
    tokens = jnp.asarray(
        np.random.RandomState(3).randint(0, TINY.vocab_size, (2, PROMPT)), jnp.int32
    )
    return tokens, jnp.asarray([PROMPT, PROMPT - 2], jnp.int32)


@pytest.mark.parametrize("mode", ["standard", "ladder"])
def test_tp_decode_with_the_fused_pallas_kernel(mode, prompts, monkeypatch):
    tokens, lengths = prompts
    cfg = TINY.replace(residual_mode=mode)
    params = random_params(cfg, seed=11)
    want_tok, want_lg = jax.jit(lambda p: greedy(forward, p, cfg, tokens, lengths, None, "xla"))(
        params
    )

    calls = []
    kernel = decode_triton.decode_attention_append

    def spy(call, **kw):
        calls.append(
            dict(
                k_new=call.new.k.shape,
                cache_heads=call.k_cache.shape[-2],
                k_head_offset=call.new.k_head_offset,
                v_head_offset=call.new.v_head_offset,
                interpret=kw["interpret"],
            )
        )
        return kernel(call, **kw)

    def no_xla_write(*a, **kw):
        raise AssertionError("the decode step wrote the cache with XLA, not in the kernel")

    monkeypatch.setattr(decode_triton, "decode_attention_append", spy)
    monkeypatch.setattr(decode_api, "append_to_cache", no_xla_write)
    for tp in (2, 4):
        mesh = make_mesh({"tensor": tp}, jax.devices()[:tp])
        sharded = fused.shard_fused(params, cfg, mesh)
        heads = tensor.cache_kv_heads(cfg, tp)
        calls.clear()
        got_tok, got_lg = jax.jit(
            lambda p: greedy(
                tensor.TensorParallel(mesh), p, cfg, tokens, lengths, heads, "pallas_triton"
            )
        )(sharded)
        # the fused kernel ran, on this device's [q; k; v] heads, k and v at their offsets
        hl, kl = cfg.num_attention_heads // tp, heads // tp
        assert calls, "the Pallas-Triton append kernel never ran"
        for c in calls:
            assert c == dict(
                k_new=(2, hl + 2 * kl, cfg.head_dim),
                cache_heads=kl,
                k_head_offset=hl,
                v_head_offset=hl + kl,
                interpret=True,
            ), (tp, c)
        np.testing.assert_array_equal(np.asarray(got_tok), np.asarray(want_tok), err_msg=f"TP {tp}")
        err = float(jnp.max(jnp.abs(got_lg - want_lg)) / jnp.max(jnp.abs(want_lg)))
        assert err <= 1e-5, (mode, tp, err)
