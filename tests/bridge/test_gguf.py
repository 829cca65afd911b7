"""GGUF import: tiny files written with GGUFWriter, checked against transformers' GGUF loader."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxturbo.bridge.gguf import GGUFFile, convert_gguf
from jaxturbo.bridge.hf import load_hf
from jaxturbo.bridge.safetensors_io import read_safetensors
from jaxturbo.errors import UserError
from tests.helpers.gguf_tiny import HD, write_tiny_gguf


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_matches_transformers_gguf_loader(arch, tiny_gguf, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    path, _ = tiny_gguf[arch]
    out = convert_gguf(path, tmp_path / "hf", progress=False)
    ours = read_safetensors(out / "model.safetensors")
    ref = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    ref_sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    if ref.config.tie_word_embeddings:
        ref_sd.pop("lm_head.weight")  # tied: transformers lists the shared matrix twice
    assert set(ours) == set(ref_sd)
    for name, a in ours.items():
        np.testing.assert_array_equal(a, ref_sd[name], err_msg=name)
    if arch != "qwen3":  # transformers' qwen3 GGUF config ignores key_length (head_dim)
        from transformers import AutoConfig

        ours_cfg = AutoConfig.from_pretrained(out)
        for k in (
            "hidden_size",
            "num_key_value_heads",
            "rms_norm_eps",
            "tie_word_embeddings",
            "vocab_size",
            "intermediate_size",
            "num_hidden_layers",
        ):
            assert getattr(ours_cfg, k) == getattr(ref.config, k), k


def test_f32_llama_is_exact_and_unpermuted(tmp_path):
    """Unquantised weights come back bit for bit in HF row order: the Q/K permutation (of
    weights and biases) is undone.  transformers' GGUF loader drops llama biases, so the
    reference here is the HF weights the file was written from."""
    path = tmp_path / "f32.gguf"
    weights = write_tiny_gguf(path, "llama", quant="F32", bias=True)
    cfg, params, _ = load_hf(convert_gguf(path, tmp_path / "hf", progress=False))
    assert cfg.attention_bias and cfg.head_dim == HD and cfg.rope_theta == 50000.0
    for name, w in weights.items():
        if name.startswith("model.layers."):
            _, _, i, suffix = name.split(".", 3)
            got = params["layers"][suffix][int(i)]
        else:
            got = params[name]
        np.testing.assert_array_equal(got, w, err_msg=name)


def test_config_tokenizer_and_generation_config(tiny_gguf, tmp_path):
    from transformers import AutoTokenizer

    path, _ = tiny_gguf["qwen2"]
    out = convert_gguf(path, tmp_path / "hf", progress=False)
    cfg, params, _ = load_hf(out)
    assert cfg.model_type == "qwen2" and cfg.attention_bias and cfg.tie_word_embeddings
    assert "lm_head.weight" not in params
    assert json.loads((out / "generation_config.json").read_text()) == {
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    tok = AutoTokenizer.from_pretrained(out)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
    )
    ids = tok("hello the world<|im_end|>")["input_ids"]
    assert ids[-1] == 2 and tok.convert_ids_to_tokens(ids[:2]) == ["hell", "o"]
    assert tok.decode(ids) == "hello the world<|im_end|>"
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n"


def test_unsupported_tensor_type_fails_before_writing(tmp_path):
    path = tmp_path / "q5.gguf"
    write_tiny_gguf(path, "llama", override_type=("blk.1.ffn_up.weight", "Q5_0"))
    with pytest.raises(
        UserError, match=r"blk.1.ffn_up.weight has unsupported type Q5_0; supported: .*Q4_1"
    ):
        convert_gguf(path, tmp_path / "hf", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q5.gguf"]


def test_truncated_gguf_is_user_error(tiny_gguf, tmp_path):
    path, _ = tiny_gguf["llama"]
    cut = tmp_path / "cut.gguf"
    data = path.read_bytes()
    for n in (len(data) - 1000, 100):  # lost tensor bytes; lost metadata
        cut.write_bytes(data[:n])
        with pytest.raises(UserError, match="cut.gguf"):
            convert_gguf(cut, tmp_path / "hf", progress=False)
        assert not (tmp_path / "hf").exists()


def test_unsupported_architecture(tmp_path):
    import gguf

    path = tmp_path / "gpt2.gguf"
    wr = gguf.GGUFWriter(str(path), "gpt2")
    wr.add_block_count(1)
    wr.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    with pytest.raises(
        UserError, match=r"unsupported GGUF architecture 'gpt2'.*supported: llama, qwen2, qwen3"
    ):
        GGUFFile(path)


def test_missing_file():
    with pytest.raises(UserError, match="no GGUF file at"):
        GGUFFile("/nonexistent/model.gguf")
