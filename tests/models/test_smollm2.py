"""The real SmolLM2-135M-Instruct against transformers (PyTorch, CPU, float32).

The PyTorch reference is transformers' own reading of the GGUF file (its GGUF reader, through
`smollm2_transformers_dir`, tests/conftest.py), so these tests check jaxturbo's converter and
model together against an independent implementation.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxturbo.bridge import load_model
from jaxturbo.data import WIKITEXT2_VALID
from jaxturbo.inference import generate, perplexity, window_plan

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "Water boils at",
    "The three primary colors are red,",
]
DATA = WIKITEXT2_VALID


@pytest.fixture(scope="module")
def jt(smollm2_dir):
    return load_model(smollm2_dir, progress=False)


@pytest.fixture(scope="module")
def hf_model(smollm2_transformers_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(smollm2_transformers_dir, dtype=torch.float32)
    return model.eval()


def test_logits_match_transformers(jt, hf_model):
    cfg, params, tok = jt
    from jaxturbo.models.transformer import forward

    for text in PROMPTS[:3]:
        ids = tok.encode(text)
        with torch.no_grad():
            ref = hf_model(torch.tensor([ids])).logits[0].numpy()
        out = np.asarray(forward(params, cfg, jnp.asarray([ids], jnp.int32))[0][0])
        assert np.abs(out - ref).max() <= 1e-3
        assert (out.argmax(-1) == ref.argmax(-1)).all()


def test_greedy_generation_matches_transformers(jt, hf_model):
    cfg, params, tok = jt
    prompts = [tok.encode(p) for p in PROMPTS]
    # one batch, ragged lengths; past EOS, as transformers runs with eos_token_id=None
    res = generate(params, cfg, prompts, max_new_tokens=32, stop_ids=())
    for ids, got in zip(prompts, res.tokens):
        with torch.no_grad():
            ref = hf_model.generate(
                torch.tensor([ids]),
                max_new_tokens=32,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )[0, len(ids) :].tolist()
        assert got.tolist() == ref


def test_perplexity_matches_transformers(jt, hf_model):
    cfg, params, tok = jt
    # two disjoint windows of 512, scored as one batch of 2 on both sides (the default batch of
    # 4 windows would score two rows of padding: execution, not compilation, is most of the
    # time of this model on a CPU)
    ids = np.asarray(tok.encode(DATA.read_text()[:20_000]), np.int32)[:1024]
    ours = perplexity(params, cfg, ids, window=512, batch_size=2)
    plan = window_plan(len(ids), 512, 512)
    assert [(b, e) for b, e, _ in plan] == [(0, 512), (512, 1024)]
    with torch.no_grad():
        logits = hf_model(torch.from_numpy(ids.reshape(2, 512).astype(np.int64))).logits
    nll, n = 0.0, 0
    for row, (b, e, first) in zip(logits, plan):
        logp = torch.log_softmax(row[:-1], -1)
        tgt = torch.tensor(ids[b + 1 : e], dtype=torch.long)
        nlls = -logp[torch.arange(len(tgt)), tgt]
        nll += float(nlls[first - 1 :].sum())
        n += len(tgt) - (first - 1)
    ref = float(np.exp(nll / n))
    assert ours.tokens_scored == n
    assert abs(ours.perplexity - ref) / ref < 0.005
    assert 5 < ours.perplexity < 60  # a real language model on real text


def _pallas_vs_xla(params, cfg, ids, dtype):
    """Max |logits_pallas - logits_xla| / max |logits_xla| on one batch of token ids."""
    from jaxturbo.models.transformer import forward

    params = jax.tree.map(lambda x: x.astype(dtype) if x.dtype == jnp.float32 else x, params)
    ids = jnp.asarray(ids, jnp.int32)
    xla = forward(params, cfg, ids, attn_impl="xla")[0].astype(jnp.float32)
    pallas = forward(params, cfg, ids, attn_impl="pallas")[0].astype(jnp.float32)
    assert (np.asarray(pallas).argmax(-1) == np.asarray(xla).argmax(-1)).mean() >= 0.9
    return float(jnp.abs(pallas - xla).max() / jnp.abs(xla).max())


def test_logits_with_pallas_attention_match_xla(jt):
    """The real model's prefill through the Pallas flash kernel (interpret mode on CPU) against
    the XLA attention path, float32."""
    cfg, params, tok = jt
    assert _pallas_vs_xla(params, cfg, [tok.encode(PROMPTS[2])], jnp.float32) <= 1e-5


@pytest.mark.gpu
def test_logits_with_pallas_attention_match_xla_native():
    """The same natively on the GPU in bf16 ("pallas" is the Mosaic GPU kernel on Hopper,
    Pallas-Triton elsewhere), with SmolLM2-135M's shape and random weights (the GPU machine has
    no copy of the real ones) over 300 tokens: three key blocks and a partial one."""
    import jax.random as jr

    from jaxturbo.models.config import ModelConfig
    from jaxturbo.models.init import init_params

    cfg = ModelConfig(
        model_type="llama",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        rope_theta=100000.0,
        tie_word_embeddings=True,
    )
    params = init_params(cfg, jr.PRNGKey(0))
    ids = jr.randint(jr.PRNGKey(1), (2, 300), 0, cfg.vocab_size)
    assert _pallas_vs_xla(params, cfg, ids, jnp.bfloat16) <= 0.05
