"""GGUF import: read a llama.cpp GGUF file into HF-named float32 tensors, an HF config dict and
HF tokenizer files.

`gguf.GGUFReader` parses the container (metadata and tensor byte ranges); dequantisation is our
own (`jaxturbo.bridge.dequant`).  Supported architectures: llama, qwen2, qwen3.

llama.cpp's converter permutes the rows of llama's Q and K projections so that rotary pairs are
adjacent (interleaved RoPE); HF keeps each head's pairs half a head apart.  `_unpermute_rows`
undoes that for llama only (qwen GGUFs use the neox RoPE layout and are stored unpermuted).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np

from jaxturbo.bridge.dequant import DEQUANT, dequantize
from jaxturbo.errors import UserError

ARCHES = ("llama", "qwen2", "qwen3")

# GGUF tensor name (after "blk.N.") -> HF suffix after "model.layers.N."
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLK = re.compile(r"^blk\.(\d+)\.(.+)$")

# bump when conversion output changes, so caches made by older code are rebuilt
CONVERTER_VERSION = 1
SOURCE_FILE = "jaxturbo_source.json"


def hf_name(gguf_name: str) -> str:
    """HF parameter name of a GGUF tensor name; UserError for names we cannot place."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLK.match(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    raise UserError(
        f"GGUF tensor {gguf_name!r} has no HF counterpart in jaxturbo "
        f"(supported architectures: {', '.join(ARCHES)})"
    )


def _unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Invert llama.cpp's Q/K row permutation.  `w`: `[n_head * head_dim, ...]`.

    Within each head, llama.cpp stores row pairs (i, i + head_dim/2) next to each other
    (rows 2i, 2i+1); HF stores the two halves one after the other.
    """
    hd = w.shape[0] // n_head
    return w.reshape(n_head, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's permutation (HF -> GGUF row order); used by tests to write GGUF fixtures."""
    hd = w.shape[0] // n_head
    return w.reshape(n_head, 2, hd // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---------------------------------------------------------------------------------- reading
class GGUFFile:
    """A parsed GGUF file: metadata values and tensor access in HF naming."""

    def __init__(self, path: str | Path) -> None:
        import gguf  # imported here: only GGUF import needs it

        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"no GGUF file at {self.path}")
        try:
            self.reader = gguf.GGUFReader(self.path)
        except (ValueError, IndexError, OSError, KeyError) as e:
            raise UserError(
                f"{self.path} is not a readable GGUF file ({e}); it may be truncated"
            ) from None
        self.arch = self.meta("general.architecture")
        if self.arch not in ARCHES:
            raise UserError(
                f"unsupported GGUF architecture {self.arch!r} in {self.path.name}; "
                f"supported: {', '.join(ARCHES)}"
            )

    def meta(self, key: str, default: Any = None) -> Any:
        """Metadata value (scalars as Python scalars, strings as str, arrays as lists)."""
        f = self.reader.fields.get(key)
        if f is None:
            return default
        return f.contents()

    def arch_meta(self, key: str, default: Any = None) -> Any:
        return self.meta(f"{self.arch}.{key}", default)

    def tensor_types(self) -> dict[str, str]:
        return {t.name: t.tensor_type.name for t in self.reader.tensors}

    # ------------------------------------------------------------------ config
    def hf_config(self) -> dict[str, Any]:
        """The HF `config.json` dict this file describes."""
        names = {t.name for t in self.reader.tensors}
        if "rope_freqs.weight" in names:
            raise UserError(
                f"{self.path.name} stores llama3 rope scaling as a rope_freqs tensor, which "
                "jaxturbo cannot import yet; use the model's HF safetensors directory instead"
            )

        def need(key: str) -> Any:
            v = self.arch_meta(key)
            if v is None:
                raise UserError(f"GGUF metadata lacks {self.arch}.{key} in {self.path.name}")
            return v

        hidden = int(need("embedding_length"))
        heads = int(need("attention.head_count"))
        tokens = self.meta("tokenizer.ggml.tokens")
        vocab = self.arch_meta("vocab_size") or (len(tokens) if tokens else None)
        if vocab is None:
            # the embedding's row count is the vocabulary size
            emb = next(t for t in self.reader.tensors if t.name == "token_embd.weight")
            vocab = int(emb.shape[1])
        head_dim = int(self.arch_meta("attention.key_length") or hidden // heads)
        d: dict[str, Any] = {
            "architectures": [
                {
                    "llama": "LlamaForCausalLM",
                    "qwen2": "Qwen2ForCausalLM",
                    "qwen3": "Qwen3ForCausalLM",
                }[self.arch]
            ],
            "model_type": self.arch,
            "vocab_size": int(vocab),
            "hidden_size": hidden,
            "intermediate_size": int(need("feed_forward_length")),
            "num_hidden_layers": int(need("block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(self.arch_meta("attention.head_count_kv") or heads),
            "head_dim": head_dim,
            "rms_norm_eps": float(self.arch_meta("attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": float(self.arch_meta("rope.freq_base", 10000.0)),
            "max_position_embeddings": int(self.arch_meta("context_length", 4096)),
            "tie_word_embeddings": "output.weight" not in names,
            "hidden_act": "silu",
            "bos_token_id": self.meta("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self.meta("tokenizer.ggml.eos_token_id"),
            "pad_token_id": self.meta("tokenizer.ggml.padding_token_id"),
            "torch_dtype": "float32",
        }
        if self.arch == "qwen2":
            d["attention_bias"] = "blk.0.attn_q.bias" in names
        elif self.arch == "llama":
            d["attention_bias"] = "blk.0.attn_q.bias" in names
            d["mlp_bias"] = False
        scaling = self.arch_meta("rope.scaling.type")
        if scaling not in (None, "none"):
            if scaling != "linear":
                raise UserError(
                    f"unsupported GGUF rope scaling {scaling!r}; supported: none, linear"
                )
            d["rope_scaling"] = {
                "rope_type": "linear",
                "factor": float(self.arch_meta("rope.scaling.factor", 1.0)),
            }
        return d

    # ------------------------------------------------------------------ tensors
    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """Yield `(hf_name, float32 array in HF orientation)` for every tensor, in file order."""
        n_head = int(self.arch_meta("attention.head_count"))
        n_kv = int(self.arch_meta("attention.head_count_kv") or n_head)
        for t in self.reader.tensors:
            name = hf_name(t.name)
            shape = tuple(int(s) for s in reversed(t.shape.tolist()))  # GGUF dims are fastest-first
            w = dequantize(t.data, t.tensor_type.name, shape, tensor=t.name)
            # llama.cpp permutes the biases of Q and K too
            if self.arch == "llama" and ".self_attn.q_proj." in name:
                w = _unpermute_rows(w, n_head)
            elif self.arch == "llama" and ".self_attn.k_proj." in name:
                w = _unpermute_rows(w, n_kv)
            yield name, w

    def __len__(self) -> int:
        return len(self.reader.tensors)


def check_types(g: GGUFFile) -> None:
    """Fail before any work if a tensor type cannot be dequantised."""
    bad = sorted({(ty, n) for n, ty in g.tensor_types().items() if ty not in DEQUANT})
    if bad:
        ty, n = bad[0]
        raise UserError(
            f"GGUF tensor {n} has unsupported type {ty}; supported: {', '.join(DEQUANT)}"
        )


# ---------------------------------------------------------------------------------- tokenizer
# llama.cpp pre-tokenizer names we rebuild exactly -> whether digits are split one by one
# before the gpt2 regex; other vocabularies go through transformers' GGUF tokenizer loader
_OWN_PRE = {"gpt-2": False, "smollm": True}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


def _gpt2_tokenizer(g: GGUFFile) -> Any:
    """Byte-level BPE tokenizer (tokenizers library) from the GGUF vocabulary and merges.

    Built directly rather than through transformers' GGUF path, which re-reads the whole file
    twice and imports torch.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    tokens: list[str] = g.meta("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in g.meta("tokenizer.ggml.merges") or []]
    types = g.meta("tokenizer.ggml.token_type") or [1] * len(tokens)
    unk = g.meta("tokenizer.ggml.unknown_token_id")
    bpe = models.BPE(
        vocab={t: i for i, t in enumerate(tokens)},
        merges=merges,
        unk_token=tokens[unk] if unk is not None else None,
        fuse_unk=False,
    )
    tk = Tokenizer(bpe)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if _OWN_PRE[g.meta("tokenizer.ggml.pre")]:
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        tk.pre_tokenizer = byte_level
    tk.decoder = decoders.ByteLevel()
    bos = g.meta("tokenizer.ggml.bos_token_id")
    if g.meta("tokenizer.ggml.add_bos_token", False) and bos is not None:
        tk.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A",
            pair=f"{tokens[bos]} $A {tokens[bos]} $B",
            special_tokens=[(tokens[bos], bos)],
        )
    else:
        tk.post_processor = processors.ByteLevel(trim_offsets=False)
    # added tokens are matched before BPE; control tokens are the special ones
    tk.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, ty in zip(tokens, types)
            if ty == _CONTROL
        ]
    )
    tk.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, ty in zip(tokens, types)
            if ty == _USER_DEFINED
        ]
    )
    return tk


def write_tokenizer(g: GGUFFile, out_dir: Path) -> None:
    """Write HF tokenizer files (tokenizer.json, tokenizer_config.json, chat template).

    Byte-level BPE vocabularies with the gpt2 regex (llama.cpp pre-tokenizers "gpt-2" and
    "smollm") are built here; others go through transformers' GGUF loader.  Special tokens
    come from the GGUF ids.
    """
    tokens = g.meta("tokenizer.ggml.tokens")
    if tokens is None:
        raise UserError(f"{g.path.name} has no tokenizer (tokenizer.ggml.tokens missing)")
    if g.meta("tokenizer.ggml.model") == "gpt2" and g.meta("tokenizer.ggml.pre") in _OWN_PRE:
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast(
            tokenizer_object=_gpt2_tokenizer(g), clean_up_tokenization_spaces=False
        )
    else:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(g.path.parent), gguf_file=g.path.name)
        except (ValueError, KeyError, NotImplementedError, ImportError) as e:
            raise UserError(f"cannot build a tokenizer from {g.path.name}: {e}") from None
    for role, key in (
        ("bos_token", "bos_token_id"),
        ("eos_token", "eos_token_id"),
        ("unk_token", "unknown_token_id"),
        ("pad_token", "padding_token_id"),
    ):
        i = g.meta(f"tokenizer.ggml.{key}")
        if i is not None and 0 <= int(i) < len(tokens):
            setattr(tok, role, tokens[int(i)])
    tok.model_max_length = int(g.arch_meta("context_length", tok.model_max_length))
    template = g.meta("tokenizer.chat_template")
    if template:
        tok.chat_template = template
    tok.save_pretrained(str(out_dir))


def generation_config(hf_cfg: dict[str, Any]) -> dict[str, Any]:
    """generation_config.json contents from a HF config dict."""
    return {
        k: hf_cfg[k]
        for k in ("bos_token_id", "eos_token_id", "pad_token_id")
        if hf_cfg.get(k) is not None
    }


# ---------------------------------------------------------------------------------- convert
def convert_gguf(
    gguf_path: str | Path,
    out_dir: str | Path,
    *,
    progress: bool = True,
    tokenizer: bool = True,
    exists: Literal["error", "overwrite", "keep"] = "error",
) -> Path:
    """Convert a GGUF file into an HF directory (float32 safetensors, config, tokenizer).

    Written atomically: a temporary sibling directory is renamed to `out_dir` at the end, so an
    interrupted conversion leaves nothing at `out_dir`.  If `out_dir` appears meanwhile (another
    process converted the same model) `exists` decides (see `write_hf_dir`).  Returns `out_dir`.
    """
    from jaxturbo.bridge.hf import write_hf_dir

    g = GGUFFile(gguf_path)
    check_types(g)
    cfg = g.hf_config()
    out_dir = Path(out_dir)

    def fill(tmp: Path) -> None:
        if tokenizer:
            write_tokenizer(g, tmp)
        types: dict[str, int] = {}
        for ty in g.tensor_types().values():
            types[ty] = types.get(ty, 0) + 1
        (tmp / SOURCE_FILE).write_text(
            json.dumps(
                {
                    "converter_version": CONVERTER_VERSION,
                    "gguf": str(g.path),
                    "tensor_types": types,
                },
                indent=2,
            )
        )

    tensors = g.tensors()
    if progress:
        from tqdm import tqdm

        tensors = tqdm(
            tensors, total=len(g), desc=f"converting {g.path.name}", unit="tensor", leave=False
        )
    return write_hf_dir(
        out_dir, dict(tensors), cfg, generation_config(cfg), extra=fill, exists=exists
    )
