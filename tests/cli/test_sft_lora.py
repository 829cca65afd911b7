"""`jaxturbo sft --lora-rank` on a tiny random Qwen3-MoE HF directory, expert x sequence
parallel (the cpu-8-moe preset: expert 4 x Ulysses 2): two steps, then the merged HF directory
(transformers' logits against jaxturbo's with the written adapters merged into the base) and
the adapter directory; the flags' refusals name the valid choices."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from jaxturbo.cli import main
from tests.rl.test_cli_rl import hf_logits, tiny_rl_model  # noqa: F401  (the dense fixture)

CHARS = "0123456789+=\n "
TOKENS = np.array([[3, 11, 5, 12, 8, 13, 1, 11, 2, 12, 4, 13]], np.int32)


@pytest.fixture(scope="module")
def tiny_moe_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen3-MoE (2 layers, 4 query / 2 KV heads, 8 experts, top-2) whose
    tokenizer has one token per character of "a+b=N\\n"."""
    import torch
    from tokenizers import Tokenizer, decoders, models
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen3MoeConfig

    vocab = {"<eos>": 0, **{c: i + 1 for i, c in enumerate(CHARS)}}
    t = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    t.decoder = decoders.Fuse()
    torch.manual_seed(0)
    hc = Qwen3MoeConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        norm_topk_prob=True,
        vocab_size=len(vocab),
        max_position_embeddings=64,
        eos_token_id=0,
        bos_token_id=0,
        tie_word_embeddings=False,
    )
    model = AutoModelForCausalLM.from_config(hc)
    with torch.no_grad():  # decisive routing (std 0.02 routers are near uniform)
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.copy_(0.3 * torch.randn_like(p))
    d = tmp_path_factory.mktemp("moe") / "qwen3-moe-chars"
    model.save_pretrained(d)
    PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<eos>").save_pretrained(d)
    return d


def _data(tmp_path: Path) -> Path:
    data = tmp_path / "sums.txt"
    data.write_text("\n\n".join(f"{a}+{b}={a + b}" for a in range(8) for b in range(6)))
    return data


def test_sft_lora_expert_and_sequence_parallel_writes_merged_hf_and_adapters(
    tiny_moe_dir, tmp_path
):
    import jax
    import jax.numpy as jnp

    from jaxturbo.bridge import load_params
    from jaxturbo.bridge.lora import load_adapters
    from jaxturbo.models.lora import merge
    from jaxturbo.models.transformer import forward

    out = tmp_path / "run"
    assert (
        main(
            [
                "sft",
                "--model",
                str(tiny_moe_dir),
                "--data",
                str(_data(tmp_path)),
                "--out",
                str(out),
                "--mesh",
                "cpu-8-moe",
                "--sequence-parallel",
                "ulysses",
                "--steps",
                "2",
                "--batch-size",
                "4",
                "--seq-len",
                "16",
                "--lr",
                "0.05",
                "--warmup",
                "0",
                "--lora-rank",
                "4",
                "--lora-alpha",
                "8",
                "--compute-dtype",
                "float32",
                "--no-checkpoint",
            ]
        )
        == 0
    )
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2]
    for r in recs:  # the router's metrics are logged; dropless: nothing dropped
        assert r["router_aux_loss"] > 0.5 and r["dropped_fraction"] == 0.0
    conf = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (conf["r"], conf["lora_alpha"]) == (4, 8.0)
    assert conf["target_modules"] == [
        "down_proj",
        "gate_proj",
        "k_proj",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    ]

    # the merged directory is the base with the written adapters merged in
    cfg, base = load_params(tiny_moe_dir)
    lora, adapters = load_adapters(out / "adapter", base)
    assert lora.scale == 2.0
    b = adapters["layers"]["mlp.experts.down_proj.lora_B.weight"]
    assert b.shape == (2, 8, 32, 4) and float(jnp.abs(b).max()) > 1e-3  # trained from zero
    ours = np.asarray(
        forward(merge(base, adapters, lora), cfg, jnp.asarray(TOKENS), attn_impl="xla")[0]
    )
    before = np.asarray(
        forward(jax.tree.map(jnp.asarray, base), cfg, jnp.asarray(TOKENS), attn_impl="xla")[0]
    )
    assert np.abs(ours - before).max() > 1e-3
    np.testing.assert_allclose(hf_logits(out / "hf", TOKENS), ours, atol=1e-4, rtol=0)


def _refused(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_lora_flag_refusals_name_the_valid_choices(tiny_rl_model, tmp_path, capsys):  # noqa: F811
    data = str(_data(tmp_path))
    base = [
        "sft",
        "--data",
        data,
        "--out",
        str(tmp_path / "o"),
        "--steps",
        "1",
        "--batch-size",
        "2",
        "--seq-len",
        "8",
        "--no-checkpoint",
        "--no-export",
    ]
    # names no model has: refused before the model is read (there is none at "m")
    err = _refused(capsys, base + ["--model", "m", "--lora-rank", "2", "--lora-targets", "mlp"])
    assert (
        "LoRA target 'mlp' is not a projection LoRA adapts; choose from attn, experts, "
        "down_proj, gate_proj, k_proj" in err
    )
    assert "--lora-rank -1 must be >= 0" in _refused(
        capsys, base + ["--model", "m", "--lora-rank", "-1"]
    )
    # a target this (dense) model lacks
    err = _refused(
        capsys,
        base
        + [
            "--model",
            str(tiny_rl_model),
            "--lora-rank",
            "2",
            "--lora-targets",
            "q_proj",
            "experts",
        ],
    )
    assert (
        "LoRA target 'experts' matches no projection of this model; choose from attn, "
        "k_proj, o_proj, q_proj, v_proj" in err
    )


def test_moe_on_a_tensor_mesh_names_the_axes_it_splits_over(tiny_moe_dir, tmp_path, capsys):
    err = _refused(
        capsys,
        [
            "sft",
            "--model",
            str(tiny_moe_dir),
            "--data",
            str(_data(tmp_path)),
            "--out",
            str(tmp_path / "o"),
            "--steps",
            "1",
            "--batch-size",
            "4",
            "--seq-len",
            "8",
            "--mesh",
            "tensor=2,expert=4",
            "--no-checkpoint",
        ],
    )
    assert (
        "tensor parallelism (tensor=2) of a qwen3_moe (mixture-of-experts) model is not "
        "implemented; such a model trains split over the expert, data, fsdp and sequence "
        "axes"
        in err
        and "--" not in err.split("error:", 1)[1]
    )


def test_lora_targets_from_a_config_file_keep_every_value(tmp_path):
    """A YAML list for a many-valued flag is one flag with all its values (repeating the flag
    would keep the last value only)."""
    from jaxturbo.cli import build_parser
    from jaxturbo.cli.common import config_yaml, expand_config

    sft = build_parser()._subparsers._group_actions[0].choices["sft"]
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lora_targets: [q_proj, experts]\nlora_rank: 4\n")
    args = sft.parse_args(
        expand_config(
            sft, ["--config", str(cfg), "--model", "m", "--data", "d", "--steps", "1", "--out", "o"]
        )
    )
    assert (args.lora_targets, args.lora_rank) == (["q_proj", "experts"], 4)
    (tmp_path / "resolved.yaml").write_text(config_yaml(sft, args))  # what a run writes
    again = sft.parse_args(expand_config(sft, ["--config", str(tmp_path / "resolved.yaml")]))
    assert again.lora_targets == ["q_proj", "experts"]
