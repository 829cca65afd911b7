"""`jaxturbo convert-mla` end to end on a tiny llama with a character tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from jaxturbo.cli import main


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """Tiny random Llama + a character-level tokenizer (BPE with no merges), saved as HF."""
    import torch
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    torch.manual_seed(0)
    hc = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                     max_position_embeddings=128, tie_word_embeddings=True)
    d = tmp_path_factory.mktemp("mla-cli") / "llama"
    AutoModelForCausalLM.from_config(hc).save_pretrained(d)
    vocab = {"<unk>": 0, **{chr(c): c - 31 for c in range(32, 127)}}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[],
                                                                        unk_token="<unk>")),
                                  unk_token="<unk>")
    tok.save_pretrained(d)
    return d


def test_convert_mla_cli_writes_loadable_deepseek_dir(tiny_model_dir, tmp_path, capsys):
    import torch
    from transformers import AutoModelForCausalLM

    data = tmp_path / "text.txt"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path / "mla"
    code = main(["convert-mla", "--model", str(tiny_model_dir), "--out", str(out),
                 "--method", "care", "--ranks", "adjusted", "--kv-budget", "0.5",
                 "--calib-data", str(data), "--calib-samples", "4", "--calib-len", "32",
                 "--eval-windows", "1", "--eval-window", "64", "--heal-steps", "2",
                 "--heal-batch", "2"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "perplexity:" in printed and "KV cache per token" in printed
    summary = json.loads((out / "mla_conversion.json").read_text())
    assert summary["kv_values_per_token_after"] <= 0.5 * summary["kv_values_per_token_before"]
    assert summary["heal_tokens"] == 2 * 2 * 32
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(model).__name__ == "DeepseekV3ForCausalLM"
    with torch.no_grad():
        logits = model(torch.tensor([[5, 6, 7]])).logits
    assert np.isfinite(logits.numpy()).all()


def test_convert_mla_cli_bad_budget(capsys, tmp_path):
    code = main(["convert-mla", "--model", "x", "--out", str(tmp_path / "o"), "--kv-budget", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "--kv-budget 0.0 must be in (0, 2]" in err
