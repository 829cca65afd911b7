"""Hugging Face safetensors directories <-> jaxturbo params.

jaxturbo params (see `jaxturbo.models`) keep HF names and orientation; the only change is that
the per-layer tensors are stacked on a leading layer axis:

    "model.embed_tokens.weight": [V, D]      "model.norm.weight": [D]
    "lm_head.weight": [V, D]                 (absent when cfg.tie_word_embeddings)
    "layers": {suffix: [L, ...]}             HF "model.layers.{i}.{suffix}" == layers[suffix][i]

so import/export is a name map plus stack/unstack, and a round trip keeps every bit.
Mixture-of-experts layers (`jaxturbo.models.moe`) also stack HF's per-expert tensors on an
expert axis: "model.layers.{i}.mlp.experts.{j}.gate_proj.weight" == layers[
"mlp.experts.gate_proj.weight"][i, j] (up_proj, down_proj alike); exports write that per-expert
form, as transformers' `save_pretrained` does, and imports also read transformers' fused
in-memory form ("mlp.experts.gate_up_proj" [E, 2F, D], gate rows first; "mlp.experts.down_proj").
Directories are written atomically (`<out>.tmp-XXXX`, then a rename).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np

from jaxturbo.bridge.safetensors_io import read_safetensors, write_safetensors
from jaxturbo.errors import UserError
from jaxturbo.models.config import ModelConfig
from jaxturbo.models.moe import EXPERT_STACKS, moe_layer_shapes

Params = dict[str, Any]

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 2 * 1024**3
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# buffers some checkpoints carry that are recomputed, not learned
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")
# one expert's projection (checkpoints) and transformers' fused expert stacks (state dicts)
_EXPERT = re.compile(
    r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$"
)
_FUSED_EXPERTS = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")


# ---------------------------------------------------------------------------------- layout
def global_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF names and shapes of the non-layer tensors."""
    v, d = cfg.vocab_size, cfg.hidden_size
    out = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (v, d)
    return out


def layer_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Per-layer suffixes (after `model.layers.{i}.`) and their shapes, without the layer axis."""
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    out = {
        "input_layernorm.weight": (d,),
        "post_attention_layernorm.weight": (d,),
        "self_attn.q_proj.weight": (q, d),
        "self_attn.k_proj.weight": (kv, d),
        "self_attn.v_proj.weight": (kv, d),
        "self_attn.o_proj.weight": (d, q),
        "mlp.gate_proj.weight": (f, d),
        "mlp.up_proj.weight": (f, d),
        "mlp.down_proj.weight": (d, f),
    }
    if cfg.attention_bias:
        out.update(
            {
                "self_attn.q_proj.bias": (q,),
                "self_attn.k_proj.bias": (kv,),
                "self_attn.v_proj.bias": (kv,),
            }
        )
    if cfg.qk_norm:
        out.update({"self_attn.q_norm.weight": (hd,), "self_attn.k_norm.weight": (hd,)})
    if cfg.moe is not None:  # sparse MLP: router and expert stacks instead of the dense MLP
        for n in ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"):
            del out[n]
        out.update(moe_layer_shapes(cfg.moe, d))
    return out


def stack_experts(tensors: Mapping[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """HF expert tensors (per expert, or transformers' fused stacks) -> one [E, ...] stack per
    layer and projection, named "model.layers.{i}.mlp.experts.{proj}.weight"; others as given."""
    out: dict[str, np.ndarray] = {}
    per: dict[tuple[str, str], list[np.ndarray | None]] = {}
    n_exp = cfg.moe.num_experts if cfg.moe is not None else 0
    for name, a in tensors.items():
        m, f = _EXPERT.match(name), _FUSED_EXPERTS.match(name)
        if m and n_exp:
            prefix, j, proj = m.group(1), int(m.group(2)), m.group(3)
            if j >= n_exp:
                raise UserError(
                    f"tensor {name} is expert {j}, but config.json has "
                    f"num_experts={n_exp}; config.json and the weights do not match"
                )
            per.setdefault((prefix, proj), [None] * n_exp)[j] = a
        elif f and n_exp and f.group(2) == "gate_up_proj":
            if a.ndim != 3 or a.shape[1] % 2:
                raise UserError(
                    f"tensor {name} has shape {list(a.shape)}; expected "
                    "[experts, 2 * moe_intermediate_size, hidden]"
                )
            half = a.shape[1] // 2
            out[f"{f.group(1)}.gate_proj.weight"] = a[:, :half]
            out[f"{f.group(1)}.up_proj.weight"] = a[:, half:]
        elif f and n_exp:
            out[f"{f.group(1)}.down_proj.weight"] = a
        else:
            out[name] = a
    for (prefix, proj), xs in per.items():
        missing = [j for j, x in enumerate(xs) if x is None]
        if missing:
            raise UserError(
                f"weights lack tensor {prefix}.{missing[0]}.{proj}.weight "
                f"(and {len(missing) - 1} more experts) that config.json's "
                f"num_experts={n_exp} requires"
            )
        if len({(x.shape, x.dtype) for x in xs}) > 1:
            raise UserError(
                f"the experts of {prefix} disagree on the shape or dtype of {proj}: "
                f"{sorted({(tuple(x.shape), str(x.dtype)) for x in xs})}"
            )
        out[f"{prefix}.{proj}.weight"] = np.stack(xs)
    return out


def params_from_hf(tensors: Mapping[str, np.ndarray], cfg: ModelConfig) -> Params:
    """HF-named tensors -> params with stacked layers (numpy).  Validates names and shapes."""
    gshape, lshape = global_shapes(cfg), layer_shapes(cfg)
    n_layers = cfg.num_hidden_layers
    tensors = stack_experts(tensors, cfg)
    per_layer: dict[str, list[np.ndarray | None]] = {s: [None] * n_layers for s in lshape}
    params: Params = {}
    for name, a in tensors.items():
        m = _LAYER.match(name)
        if m and m.group(2) in lshape and int(m.group(1)) < n_layers:
            want = lshape[m.group(2)]
            per_layer[m.group(2)][int(m.group(1))] = a
        elif name in gshape:
            want = gshape[name]
            params[name] = a
        elif _IGNORED.search(name) or (name == "lm_head.weight" and cfg.tie_word_embeddings):
            continue  # tied checkpoints sometimes store the shared matrix twice
        else:
            raise UserError(
                f"unexpected tensor {name} for a {cfg.model_type} model with "
                f"{n_layers} layers (attention_bias={cfg.attention_bias}, qk_norm={cfg.qk_norm}); "
                "config.json and the weights do not match"
            )
        if tuple(a.shape) != want:
            raise UserError(
                f"tensor {name} has shape {list(a.shape)} but config.json implies {list(want)}; "
                "config.json and the weights do not match"
            )
    missing = [n for n in gshape if n not in params]
    missing += [
        f"model.layers.{i}.{s}"
        for s, xs in per_layer.items()
        for i, x in enumerate(xs)
        if x is None
    ]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise UserError(
            f"weights lack tensor(s) {', '.join(missing[:3])}{more} that config.json requires"
        )
    layers = {}
    for s, xs in per_layer.items():
        dts = {x.dtype for x in xs}
        if len(dts) > 1:
            raise UserError(f"layers disagree on the dtype of {s}: {sorted(map(str, dts))}")
        layers[s] = np.stack(xs)
    params["layers"] = layers
    return params


def hf_from_params(params: Params, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """params (numpy or jax arrays) -> HF-named numpy tensors, in HF's usual order."""
    gshape, lshape = global_shapes(cfg), layer_shapes(cfg)
    layers = params.get("layers", {})
    bad = sorted(set(layers) - set(lshape)) + sorted(
        k for k in params if k != "layers" and k not in gshape
    )
    if bad:
        raise UserError(f"params hold {bad[0]}, which a {cfg.model_type} config does not have")
    out: dict[str, np.ndarray] = {}
    emb = "model.embed_tokens.weight"
    for name in [emb] + [n for n in gshape if n != emb]:
        if name not in params:
            raise UserError(f"params lack {name}")
        out[name] = _checked(name, np.asarray(params[name]), gshape[name])
    stacked = {}
    for s, want in lshape.items():
        if s not in layers:
            raise UserError(f"params lack layers[{s!r}]")
        stacked[s] = _checked(
            f"layers[{s!r}]", np.asarray(layers[s]), (cfg.num_hidden_layers, *want)
        )
    for i in range(cfg.num_hidden_layers):
        for s in lshape:
            if s in EXPERT_STACKS:  # one tensor per expert, as save_pretrained writes them
                for j in range(stacked[s].shape[1]):
                    out[f"model.layers.{i}.{s.replace('.experts.', f'.experts.{j}.')}"] = stacked[
                        s
                    ][i, j]
            else:
                out[f"model.layers.{i}.{s}"] = stacked[s][i]
    return out


def _checked(name: str, a: np.ndarray, want: tuple[int, ...]) -> np.ndarray:
    if tuple(a.shape) != want:
        raise UserError(f"{name} has shape {list(a.shape)}, the config implies {list(want)}")
    return a


# ---------------------------------------------------------------------------------- reading
def read_hf_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of an HF directory (single file or sharded with an index), memory-mapped."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{index} is not a valid safetensors index ({e})") from None
        tensors: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            if not (path / shard).is_file():
                raise UserError(f"{index} names shard {shard}, which is missing from {path}")
            part = read_safetensors(path / shard)
            tensors.update(part)
        absent = [n for n in weight_map if n not in tensors]
        if absent:
            raise UserError(f"{index} lists {absent[0]} but no shard holds it")
        return tensors
    if (path / WEIGHTS_FILE).exists():
        return read_safetensors(path / WEIGHTS_FILE)
    others = sorted(p.name for p in path.glob("*.bin")) + sorted(
        p.name for p in path.glob("*.gguf")
    )
    hint = (
        f" (found {', '.join(others)}: only safetensors is read from a directory"
        f"{'; pass the .gguf file itself' if any(o.endswith('.gguf') for o in others) else ''})"
        if others
        else ""
    )
    raise UserError(f"no weights in {path}: expected {WEIGHTS_FILE} or {INDEX_FILE}{hint}")


def load_hf(path: str | Path, dtype: Any = None) -> tuple[ModelConfig, Params, Path]:
    """Load an HF safetensors directory.

    Returns `(cfg, params, path)`: params as jax arrays in the layout above, each tensor's
    stored dtype kept unless `dtype` is given (floating tensors are then cast to it).
    """
    import jax.numpy as jnp

    path = Path(path)
    if not path.is_dir():
        raise UserError(f"model directory {path} does not exist")
    cfg = ModelConfig.from_json(path / "config.json")
    host = params_from_hf(read_hf_tensors(path), cfg)

    def to_jax(a: np.ndarray) -> Any:
        x = jnp.asarray(a)  # copies out of the memory map
        if dtype is not None and jnp.issubdtype(x.dtype, jnp.floating):
            x = x.astype(dtype)
        return x

    import jax

    return cfg, jax.tree.map(to_jax, host), path


# ---------------------------------------------------------------------------------- writing
def _shards(tensors: Mapping[str, np.ndarray], max_bytes: int) -> list[dict[str, np.ndarray]]:
    """Split into consecutive groups of at most `max_bytes` (a bigger tensor gets its own)."""
    groups: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, a in tensors.items():
        if groups[-1] and size + a.nbytes > max_bytes:
            groups.append({})
            size = 0
        groups[-1][name] = a
        size += a.nbytes
    return groups


def write_hf_dir(
    out_dir: str | Path,
    tensors: Mapping[str, np.ndarray],
    hf_config: dict[str, Any],
    gen_config: dict[str, Any] | None = None,
    *,
    extra: Callable[[Path], None] | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    exists: Literal["error", "overwrite", "keep"] = "error",
) -> Path:
    """Write an HF directory atomically: weights (sharded above `max_shard_bytes`, with an
    index), config.json, generation_config.json, then `extra(tmp_dir)` (e.g. tokenizer files).

    `exists` says what to do when `out_dir` already exists: `"error"` (UserError, checked before
    any work), `"overwrite"`, or `"keep"` (keep the existing directory and drop ours; for caches
    that another process may fill at the same time).
    """
    out = Path(out_dir)
    if exists == "error" and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(
            f"output directory {out} already exists and is not empty; choose another output directory"
        )
    created = [p for p in reversed(out.absolute().parents) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    try:
        groups = _shards(tensors, max_shard_bytes)
        if len(groups) == 1:
            write_safetensors(tmp / WEIGHTS_FILE, groups[0])
        else:
            weight_map, total = {}, 0
            for k, g in enumerate(groups):
                fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
                total += write_safetensors(tmp / fname, g)
                weight_map.update({n: fname for n in g})
            (tmp / INDEX_FILE).write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
            )
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        if gen_config is not None:
            (tmp / "generation_config.json").write_text(json.dumps(gen_config, indent=2))
        if extra is not None:
            extra(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the result is an ordinary directory
        _commit(tmp, out, exists)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in reversed(created):  # parents we made for it, innermost first
            try:
                p.rmdir()
            except OSError:
                break
        raise
    return out


def _commit(tmp: Path, out: Path, exists: str) -> None:
    """Move the finished `tmp` to `out`."""
    try:
        os.rename(tmp, out)  # atomic; also replaces an empty directory
        return
    except OSError:
        if not out.exists():
            raise
    if exists == "keep":
        shutil.rmtree(tmp)
    elif exists == "overwrite":
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        raise UserError(
            f"output directory {out} already exists and is not empty; choose another output directory"
        )


def _dtype_name(params: Params) -> str:
    """HF `torch_dtype` of the floating params (the embedding's dtype)."""
    return str(np.asarray(params["model.embed_tokens.weight"][:1]).dtype)


def save_hf(
    params: Params,
    cfg: ModelConfig,
    out_dir: str | Path,
    tokenizer_src: str | Path | Any | None = None,
    *,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
) -> Path:
    """Export params as an HF directory that transformers' `from_pretrained` loads.

    Writes safetensors (each tensor in its own dtype; sharded with an index above
    `max_shard_bytes`), `config.json` (`cfg.to_hf_dict()`), `generation_config.json`, and the
    tokenizer: `tokenizer_src` is a directory whose tokenizer files (and generation config, if
    any) are copied, or a tokenizer object with `save_pretrained`.  Atomic: on any error nothing
    is left at `out_dir`.  Returns `out_dir`.
    """
    tensors = hf_from_params(params, cfg)
    hf_cfg = cfg.to_hf_dict()
    hf_cfg["torch_dtype"] = _dtype_name(params)
    return write_hf_dir(
        out_dir,
        tensors,
        hf_cfg,
        generation_config(hf_cfg),
        extra=tokenizer_writer(tokenizer_src),
        max_shard_bytes=max_shard_bytes,
        exists="overwrite" if overwrite else "error",
    )


def generation_config(hf_cfg: dict[str, Any]) -> dict[str, Any]:
    """`generation_config.json` of an export: the config's special token ids that are set."""
    return {
        k: hf_cfg[k]
        for k in ("bos_token_id", "eos_token_id", "pad_token_id")
        if hf_cfg.get(k) is not None
    }


def tokenizer_writer(tokenizer_src: str | Path | Any | None) -> Callable[[Path], None]:
    """What writes an export's tokenizer into its directory: `tokenizer_src` is a directory
    whose tokenizer files (and generation config, if any) are copied, a tokenizer object with
    `save_pretrained`, or None.  A missing directory is a UserError now, before any work."""
    src = None
    if tokenizer_src is not None and not hasattr(tokenizer_src, "save_pretrained"):
        src = Path(tokenizer_src)
        if not src.is_dir():
            raise UserError(f"tokenizer source {src} is not a directory")

    def write(tmp: Path) -> None:
        if src is not None:
            for name in TOKENIZER_FILES + ("generation_config.json",):
                if (src / name).is_file():
                    shutil.copyfile(src / name, tmp / name)
        elif tokenizer_src is not None:
            tokenizer_src.save_pretrained(str(tmp))

    return write
