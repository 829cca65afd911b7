"""`jaxturbo convert-mla` end to end on a tiny llama with a character tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from jaxturbo.cli import main
from tests.helpers.deepseek_tiny import char_tokenizer, save_with_tokenizer, torch_logits


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """Tiny random Llama + a character-level tokenizer (BPE with no merges), saved as HF."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    hc = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    return save_with_tokenizer(
        AutoModelForCausalLM.from_config(hc), tmp_path_factory.mktemp("mla-cli") / "llama"
    )


def test_convert_mla_cli_writes_loadable_deepseek_dir(
    tiny_model_dir, tmp_path, capsys, monkeypatch
):
    """Adjusted ranks (per-layer latent widths zero-padded to kv_lora_rank) after healing: the
    exported directory, loaded by transformers, gives the logits of the model the command held
    in memory (captured where it is saved) within 1e-4."""
    import jax
    import jax.numpy as jnp
    from transformers import AutoModelForCausalLM

    import jaxturbo.bridge.deepseek as deepseek
    from jaxturbo.models.mla import mla_forward

    saved = {}
    real_save = deepseek.save_deepseek

    def capture(params, cfg, *args, **kw):
        saved.update(params=params, cfg=cfg)
        return real_save(params, cfg, *args, **kw)

    monkeypatch.setattr(deepseek, "save_deepseek", capture)

    data = tmp_path / "text.txt"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path / "mla"
    code = main(
        [
            "convert-mla",
            "--model",
            str(tiny_model_dir),
            "--out",
            str(out),
            "--method",
            "care",
            "--ranks",
            "adjusted",
            "--kv-budget",
            "0.5",
            "--calib-data",
            str(data),
            "--calib-samples",
            "4",
            "--calib-len",
            "32",
            "--eval-tokens",
            "64",
            "--eval-window",
            "64",
            "--heal-steps",
            "2",
            "--heal-batch",
            "2",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert "perplexity:" in printed and "KV cache per token" in printed
    summary = json.loads((out / "mla_conversion.json").read_text())
    assert summary["kv_values_per_token_after"] <= 0.5 * summary["kv_values_per_token_before"]
    assert summary["heal_tokens"] == 2 * 2 * 32
    cfg = saved["cfg"]
    assert cfg.layer_ranks is not None and len(set(cfg.layer_ranks)) > 1  # padded layers
    assert not cfg.latent_norm  # the norm trick
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(model).__name__ == "DeepseekV3ForCausalLM"
    toks = np.asarray([[5, 6, 7, 40, 41, 2, 90, 13, 13, 60, 1, 77]], np.int32)
    ours, _ = mla_forward(
        jax.tree.map(jnp.asarray, saved["params"]), cfg, jnp.asarray(toks), attn_impl="xla"
    )
    np.testing.assert_allclose(torch_logits(model, toks), np.asarray(ours), atol=1e-4, rtol=0)


def test_held_out_windows_are_never_calibrated_or_healed(
    tiny_model_dir, tmp_path, capsys, monkeypatch
):
    """The text is lowercase but for its last 64 characters (uppercase; the tokenizer maps one
    character to one token): the perplexity windows must be exactly those, and no calibration
    or heal token may be one of them.  The heal asks for 6 x 32 tokens, more than the 128
    before the held-out part, so taking its windows from the whole text would reach into it."""
    import jaxturbo.convert.mla.calibrate as calibrate
    import jaxturbo.convert.mla.evaluate as mla_evaluate
    import jaxturbo.convert.mla.heal as heal_mod
    import jaxturbo.inference as evaluate_pkg

    seen: dict[str, list[np.ndarray]] = {"calib": [], "heal": [], "eval": []}
    real_cov, real_ppl, real_mla_ppl = (
        calibrate.attention_input_covariance,
        evaluate_pkg.perplexity,
        mla_evaluate.mla_perplexity,
    )

    def cov(params, cfg, batches, **kw):
        batches = list(batches)
        seen["calib"] += batches
        return real_cov(params, cfg, batches, **kw)

    def heal(student, mla_cfg, teacher, teacher_cfg, batches, **kw):
        seen["heal"] += batches
        return student  # what it trained on is all this test needs

    def ppl(params, cfg, ids, **kw):
        seen["eval"].append(np.asarray(ids))
        return real_ppl(params, cfg, ids, **kw)

    def mla_ppl(params, cfg, ids, **kw):
        seen["eval"].append(np.asarray(ids))
        return real_mla_ppl(params, cfg, ids, **kw)

    monkeypatch.setattr(calibrate, "attention_input_covariance", cov)
    monkeypatch.setattr(heal_mod, "heal", heal)
    monkeypatch.setattr(evaluate_pkg, "perplexity", ppl)
    monkeypatch.setattr(mla_evaluate, "mla_perplexity", mla_ppl)

    body = ("abcdefghijklmnopqrstuvwxyz" * 5)[:128]
    tail = ("ABCDEFGHIJKLMNOPQRSTUVWXYZ" * 3)[:64]
    data = tmp_path / "text.txt"
    data.write_text(body + tail)
    code = main(
        [
            "convert-mla",
            "--model",
            str(tiny_model_dir),
            "--out",
            str(tmp_path / "mla"),
            "--kv-budget",
            "0.5",
            "--calib-data",
            str(data),
            "--calib-samples",
            "2",
            "--calib-len",
            "32",
            "--eval-tokens",
            "64",
            "--eval-window",
            "32",
            "--heal-steps",
            "3",
            "--heal-batch",
            "2",
        ]
    )
    assert code == 0, capsys.readouterr().err
    tok = char_tokenizer()
    upper = set(tok.encode(tail, add_special_tokens=False))
    assert len(seen["eval"]) == 2
    for ids in seen["eval"]:
        assert list(ids) == tok.encode(tail, add_special_tokens=False)
    for stage in ("calib", "heal"):
        used = np.concatenate([b.ravel() for b in seen[stage]])
        assert used.size and not upper & set(used.tolist()), stage
    summary = json.loads((tmp_path / "mla" / "mla_conversion.json").read_text())
    assert summary["data_tokens"] == {
        "calibration": [0, 64],
        "heal": [0, 128],
        "evaluation": [128, 192],
    }


def test_convert_mla_cli_bad_budget(capsys, tmp_path):
    code = main(["convert-mla", "--model", "x", "--out", str(tmp_path / "o"), "--kv-budget", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "--kv-budget 0.0 must be in (0, 2]" in err
