"""The real SmolLM2-135M converted to MLA (`smollm2_mla_dir`, tests/convert/conftest.py) is a model
like any other: `load_model` + the jaxturbo forward against transformers' loading of the same
directory, the `ppl` and `generate` commands, and a bitwise `export-hf` round trip."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from jaxturbo.cli import main
from jaxturbo.data import WIKITEXT2_VALID

pytestmark = pytest.mark.slow
WIKITEXT = WIKITEXT2_VALID


@pytest.fixture(scope="module")
def hf_model(smollm2_mla_dir):
    """transformers' own loading of the converted directory, float32."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_mla_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(smollm2_mla_dir):
    from jaxturbo.bridge import load_tokenizer

    return load_tokenizer(smollm2_mla_dir)


def _hf_logits(model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.numpy()


def test_load_model_logits_match_transformers(smollm2_mla_dir, hf_model, tokenizer):
    import jax.numpy as jnp

    from jaxturbo.bridge import load_model
    from jaxturbo.models import MLAConfig, model_functions

    cfg, params, _ = load_model(smollm2_mla_dir)
    assert isinstance(cfg, MLAConfig) and cfg.num_hidden_layers == 30
    assert len(set(cfg.layer_ranks)) > 1 and max(cfg.layer_ranks) == cfg.kv_lora_rank
    assert params["layers"]["self_attn.kv_b_proj.weight"].shape == (30, 9 * 128, cfg.kv_lora_rank)
    text = WIKITEXT.read_text()[:4000]
    ids = np.asarray([tokenizer.encode(text, add_special_tokens=False)[:96]], np.int32)
    ours, _ = model_functions(cfg).forward(params, cfg, jnp.asarray(ids), attn_impl="xla")
    ours, ref = np.asarray(ours), _hf_logits(hf_model, ids)
    assert np.abs(ours - ref).max() <= 1e-3
    np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))


def test_ppl_command_matches_transformers(smollm2_mla_dir, hf_model, tokenizer, tmp_path, capsys):
    """`jaxturbo ppl` on the directory: two disjoint windows of 64 tokens, each scoring its last
    63; transformers' perplexity of the same windows agrees to 1e-4 (relative)."""
    import torch

    data = tmp_path / "text.txt"
    data.write_text(WIKITEXT.read_text()[:3000])
    assert (
        main(
            [
                "ppl",
                "--model",
                str(smollm2_mla_dir),
                "--data",
                str(data),
                "--window",
                "64",
                "--max-tokens",
                "128",
                "--windows-per-batch",
                "2",
            ]
        )
        == 0
    )
    ours = float(re.search(r"perplexity: ([0-9.]+)", capsys.readouterr().out).group(1))
    ids = np.asarray(tokenizer.encode(data.read_text(), add_special_tokens=False)[:128])
    nll = []
    for w in (ids[:64], ids[64:]):
        logp = torch.log_softmax(torch.tensor(_hf_logits(hf_model, w[None])[0, :-1]), -1)
        nll += (-logp[torch.arange(63), torch.tensor(w[1:], dtype=torch.long)]).tolist()
    ref = math.exp(np.mean(nll))
    assert abs(ours - ref) <= 1e-4 * ref, (ours, ref)


def test_generate_command_matches_transformers_greedy(smollm2_mla_dir, hf_model, tokenizer, capsys):
    """`jaxturbo generate` (greedy, a batch of two prompts of different lengths) prints what
    transformers' greedy `generate` continues each prompt with, up to the first stop token."""
    import torch

    from jaxturbo.bridge import load_model
    from jaxturbo.cli.generate import stop_ids_for

    prompts = ["The tower was built in", "Robert Boulter is an English film and television actor."]
    n = 8
    assert (
        main(
            [
                "generate",
                "--model",
                str(smollm2_mla_dir),
                "--no-stream",
                "--max-new-tokens",
                str(n),
                *[a for p in prompts for a in ("--prompt", p)],
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    stops = set(stop_ids_for(load_model(smollm2_mla_dir)[0], tokenizer))
    for p in prompts:
        ids = tokenizer.encode(p, add_special_tokens=True)
        with torch.no_grad():
            new = hf_model.generate(
                torch.tensor([ids]),
                max_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
                eos_token_id=None,
            )[0, len(ids) :].tolist()
        cut = next((i + 1 for i, t in enumerate(new) if t in stops), n)
        assert cut >= 4, new  # a few real tokens to compare
        want = tokenizer.decode(new[:cut], skip_special_tokens=True)
        assert f"--- {p}\n{want}\n" in printed, (want, printed)


def test_export_hf_round_trip_is_bitwise(smollm2_mla_dir, tmp_path, capsys):
    """HF -> jaxturbo -> HF with `jaxturbo export-hf`: every tensor and config.json identical
    (the conversion's latent norm is read back as stored, so nothing is re-derived)."""
    from jaxturbo.bridge.hf import read_hf_tensors

    out = tmp_path / "again"
    assert main(["export-hf", "--model", str(smollm2_mla_dir), "--out", str(out)]) == 0
    a, b = read_hf_tensors(smollm2_mla_dir), read_hf_tensors(out)
    assert set(a) == set(b) and len(a) == 2 + 30 * 10
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].tobytes() == b[name].tobytes(), name
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (smollm2_mla_dir / "config.json").read_text()
    )
    assert (out / "tokenizer.json").read_bytes() == (
        smollm2_mla_dir / "tokenizer.json"
    ).read_bytes()
