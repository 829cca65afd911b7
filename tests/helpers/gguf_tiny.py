"""Tiny GGUF files written with `gguf.GGUFWriter`: random weights, a byte-level BPE vocabulary.

Weights are made in HF orientation and written the way llama.cpp's converter writes them
(Q/K rows permuted for llama), so an importer that forgets to undo that fails the tests.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxturbo.bridge.gguf import _permute_rows

D, F, H, HKV, HD, L = 64, 128, 4, 2, 16, 2
MERGES = ["Ġ t", "h e", "Ġt he", "l l", "he ll"]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
)


def byte_vocab() -> list[str]:
    """Special tokens, the 256 byte-level symbols, then the merge results."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    syms = list(bytes_to_unicode().values())
    return SPECIAL + syms + [m.replace(" ", "") for m in MERGES]


def tiny_hf_weights(
    arch: str, tied: bool, vocab: int, seed: int = 0, bias: bool = False
) -> dict[str, np.ndarray]:
    """Random float32 HF-named weights of a tiny llama/qwen2/qwen3 model."""
    rng = np.random.default_rng(seed)
    w = lambda *s: rng.standard_normal(s).astype(np.float32) * 0.5  # noqa: E731
    out = {"model.embed_tokens.weight": w(vocab, D), "model.norm.weight": w(D)}
    if not tied:
        out["lm_head.weight"] = w(vocab, D)
    for i in range(L):
        p = f"model.layers.{i}."
        out.update(
            {
                p + "input_layernorm.weight": w(D),
                p + "post_attention_layernorm.weight": w(D),
                p + "self_attn.q_proj.weight": w(H * HD, D),
                p + "self_attn.k_proj.weight": w(HKV * HD, D),
                p + "self_attn.v_proj.weight": w(HKV * HD, D),
                p + "self_attn.o_proj.weight": w(D, H * HD),
                p + "mlp.gate_proj.weight": w(F, D),
                p + "mlp.up_proj.weight": w(F, D),
                p + "mlp.down_proj.weight": w(D, F),
            }
        )
        if arch == "qwen2" or bias:
            out.update(
                {
                    p + "self_attn.q_proj.bias": w(H * HD),
                    p + "self_attn.k_proj.bias": w(HKV * HD),
                    p + "self_attn.v_proj.bias": w(HKV * HD),
                }
            )
        if arch == "qwen3":
            out.update({p + "self_attn.q_norm.weight": w(HD), p + "self_attn.k_norm.weight": w(HD)})
    return out


_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_TO_GGUF = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf: str) -> str:
    if hf in _TO_GGUF:
        return _TO_GGUF[hf]
    _, _, i, suffix = hf.split(".", 3)
    return f"blk.{i}.{_LAYER_TO_GGUF[suffix]}"


def write_tiny_gguf(
    path: Path,
    arch: str = "llama",
    tied: bool = False,
    quant: str = "Q8_0",
    seed: int = 0,
    override_type: tuple[str, str] | None = None,
    bias: bool = False,
) -> dict[str, np.ndarray]:
    """Write a tiny GGUF; matrices in `quant` (F32/F16/Q8_0/...), vectors in F32.

    `bias` adds Q/K/V biases (llama with attention_bias).
    `override_type=(gguf_tensor_name, type)` stores one tensor in another type (raw random
    bytes), to test unsupported types.  Returns the HF-orientation float32 weights written.
    """
    import gguf

    vocab = byte_vocab()
    weights = tiny_hf_weights(arch, tied, len(vocab), seed, bias)
    wr = gguf.GGUFWriter(str(path), arch)
    wr.add_block_count(L)
    wr.add_context_length(256)
    wr.add_embedding_length(D)
    wr.add_feed_forward_length(F)
    wr.add_head_count(H)
    wr.add_head_count_kv(HKV)
    wr.add_key_length(HD)
    wr.add_value_length(HD)
    wr.add_rope_freq_base(50000.0)
    wr.add_layer_norm_rms_eps(1e-5)
    wr.add_tokenizer_model("gpt2")
    wr.add_tokenizer_pre("gpt-2")
    wr.add_token_list(vocab)
    wr.add_token_types([3] * len(SPECIAL) + [1] * (len(vocab) - len(SPECIAL)))
    wr.add_token_merges(MERGES)
    wr.add_bos_token_id(1)
    wr.add_eos_token_id(2)
    wr.add_pad_token_id(0)
    wr.add_chat_template(TEMPLATE)
    qtype = gguf.GGMLQuantizationType[quant]
    for name, w in weights.items():
        g = gguf_name(name)
        if arch == "llama" and ".q_proj." in name:
            w = _permute_rows(w, H)
        elif arch == "llama" and ".k_proj." in name:
            w = _permute_rows(w, HKV)
        if override_type and override_type[0] == g:
            t = gguf.GGMLQuantizationType[override_type[1]]
            block, size = gguf.GGML_QUANT_SIZES[t]
            raw = np.random.default_rng(1).integers(
                0, 255, (w.shape[0], w.shape[1] // block * size), dtype=np.uint8
            )
            wr.add_tensor(g, raw, raw_dtype=t)
        elif w.ndim == 2 and quant != "F32":
            wr.add_tensor(g, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
        else:
            wr.add_tensor(g, w)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    return weights
