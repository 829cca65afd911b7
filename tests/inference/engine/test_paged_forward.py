"""The model's paged-cache branch: a flat ragged batch mixing a fresh prefill, a decode and a
chunk that continues a cached prefix gives the logits of the cache-free forward of each whole
sequence, in every residual mode, with fused projections, q/k norm, biases and a sliding window
(tensor parallelism: test_engine_tensor_parallel.py)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from jaxturbo.inference.fused import fuse_projections
from jaxturbo.models.transformer import PagedCache, forward
from tests.inference.engine.models import random_prompts, tiny_model

PS, T, NUM_PAGES, MAX_PAGES = 16, 48, 8, 3
# (prompt length, tokens cached by the first call, pages): a fresh 10-token prefill, a decode
# at position 20, and the chunk [16, 24) after a cached page
SEQS = [(10, 0, [1]), (21, 20, [2, 3]), (24, 16, [4, 5])]


def batch(tokens: list[list[int]], spans: list[tuple[int, int]], tables: list[list[int]]):
    """Flat ragged batch (padded to T tokens) of tokens[s][a:b] for (a, b) in spans:
    (tokens [1, T], positions [1, T], slot_mapping, page_tables, seq_lens, query_start_loc)."""
    tok, pos, slot = np.zeros(T, np.int32), np.zeros(T, np.int32), np.zeros(T, np.int32)
    pt = np.zeros((len(spans), MAX_PAGES), np.int32)
    lens, qsl, at = np.zeros(len(spans), np.int32), [0], 0
    for s, ((a, b), table) in enumerate(zip(spans, tables)):
        pt[s, : len(table)] = table
        p = np.arange(a, b)
        tok[at : at + b - a], pos[at : at + b - a] = np.asarray(tokens[s])[a:b], p
        slot[at : at + b - a] = pt[s, p // PS] * PS + p % PS
        at += b - a
        lens[s] = b if b > a else 0
        qsl.append(at)
    return (
        jnp.asarray(tok)[None],
        jnp.asarray(pos)[None],
        jnp.asarray(slot),
        jnp.asarray(pt),
        jnp.asarray(lens),
        jnp.asarray(qsl, dtype=jnp.int32),
    )


def seq_tokens(cfg) -> list[list[int]]:
    return random_prompts([n for n, _, _ in SEQS], cfg.vocab_size, seed=1)


def paged_logits(params, cfg, window=None):
    """Logits [total new tokens, V] of the mixed batch, after a first call wrote the prefixes."""
    tokens = seq_tokens(cfg)
    tables = [t for _, _, t in SEQS]
    shape = (cfg.num_hidden_layers, NUM_PAGES, PS, cfg.num_key_value_heads, cfg.head_dim)
    pages = (jnp.zeros(shape), jnp.zeros(shape))

    @jax.jit
    def run(params, pages, tok, pos, slot, pt, lens, qsl):
        cache = PagedCache(*pages, slot, pt, lens, qsl, sliding_window=window)
        logits, cache = forward(params, cfg, tok, positions=pos, cache=cache)
        return logits[0], (cache.k_pages, cache.v_pages)

    _, pages = run(params, pages, *batch(tokens, [(0, c) for _, c, _ in SEQS], tables))
    logits, _ = run(params, pages, *batch(tokens, [(c, n) for n, c, _ in SEQS], tables))
    return np.asarray(logits[: sum(n - c for n, c, _ in SEQS)])


def reference_logits(params, cfg, tokens, attn_fn=None):
    """The cache-free forward of each whole sequence (right-padded rows of one causal batch),
    at the positions the paged batch computed."""
    width = max(map(len, tokens))
    rows = jnp.asarray([seq + [0] * (width - len(seq)) for seq in tokens])
    logits = np.asarray(forward(params, cfg, rows, attn_fn=attn_fn)[0])
    return np.concatenate([logits[i, c:n] for i, (n, c, _) in enumerate(SEQS)])


@pytest.mark.parametrize(
    "family,mode,fused",
    [("llama", "standard", True), ("qwen3", "ladder", False), ("qwen2", "parallel", False)],
)
def test_paged_batch_matches_cache_free_forward(family, mode, fused):
    extra = {"qwen3": dict(qk_norm=True), "qwen2": dict(attention_bias=True)}.get(family, {})
    cfg, params = tiny_model(model_type=family, residual_mode=mode, **extra)
    ref = reference_logits(params, cfg, seq_tokens(cfg))
    if fused:
        params = fuse_projections(params, cfg)
    got = paged_logits(params, cfg)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_sliding_window_matches_windowed_attention():
    """A 6-token window (hybrid residual): the kernel's window equals the causal mask that
    keeps the last 6 positions (sliding_window=5 in the dense attention's convention)."""
    cfg, params = tiny_model(residual_mode="hybrid", ladder_layers=1)
    got, tokens = paged_logits(params, cfg, window=6), seq_tokens(cfg)
    windowed = functools.partial(
        pallas_kernels.attention, causal=True, sliding_window=5, implementation="xla"
    )
    ref = reference_logits(
        params, cfg, tokens, attn_fn=lambda q, k, v, segment_ids: windowed(q, k, v)
    )
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    # the window matters here: full attention gives other logits
    assert np.abs(got - reference_logits(params, cfg, tokens)).max() > 1e-2


def test_paged_cache_needs_positions():
    cfg, params = tiny_model()
    z = jnp.zeros((1, 1, PS, 2, 8))
    cache = PagedCache(
        z,
        z,
        jnp.zeros(4, jnp.int32),
        jnp.zeros((1, 1), jnp.int32),
        jnp.zeros(1, jnp.int32),
        jnp.zeros(2, jnp.int32),
    )
    with pytest.raises(ValueError, match="positions"):
        forward(params, cfg, jnp.zeros((1, 4), jnp.int32), cache=cache)
