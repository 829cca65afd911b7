"""`jaxturbo ladderize`: hybrid conversion written as an HF directory, same weights; bad values
are one-line errors naming what is valid; --help and the output state the quality cost of an
unhealed conversion.  Healing (KL distillation toward the unchanged model) moves the student
toward the teacher on the tokens it trains on, never trains on a scored token, and what it
exports is what it scored."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxturbo.bridge.hf import global_shapes, layer_shapes, load_hf, read_hf_tensors, save_hf
from jaxturbo.cli import main
from jaxturbo.convert.ladderize import heal, heal_batches, ladderize
from jaxturbo.errors import UserError
from jaxturbo.models.config import ModelConfig
from jaxturbo.models.init import init_params
from jaxturbo.models.transformer import forward
from tests.helpers.deepseek_tiny import char_tokenizer

CFG = ModelConfig(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    tie_word_embeddings=True,
)


def _random_params(cfg: ModelConfig) -> dict:
    rng = np.random.RandomState(0)
    params = {n: rng.randn(*s).astype(np.float32) for n, s in global_shapes(cfg).items()}
    params["layers"] = {
        n: rng.randn(cfg.num_hidden_layers, *s).astype(np.float32)
        for n, s in layer_shapes(cfg).items()
    }
    return params


@pytest.fixture(scope="module")
def src_dir(tmp_path_factory):
    """A tiny random standard Llama as an HF directory (no tokenizer)."""
    return save_hf(_random_params(CFG), CFG, tmp_path_factory.mktemp("src") / "tiny-llama")


@pytest.fixture(scope="module")
def src_with_tokenizer(tmp_path_factory):
    """The same kind of model with a character tokenizer (one token per character, ids < 96),
    initialised at the usual scale so that a few heal steps stay finite."""
    params = jax.tree.map(np.asarray, init_params(CFG, jax.random.key(1)))
    return save_hf(params, CFG, tmp_path_factory.mktemp("src-tok") / "tiny-llama", char_tokenizer())


def test_ladderize_writes_hybrid_dir_with_same_weights(src_dir, tmp_path, capsys):
    out = tmp_path / "tiny-ladder"
    # --layers: the older spelling of --ladder-layers, still accepted
    assert (
        main(
            [
                "ladderize",
                "--model",
                str(src_dir),
                "--layers",
                "3",
                "--out",
                str(out),
                "--eval-tokens",
                "0",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "last 3 of 4 layers" in printed
    # converted without training: the output says what that costs and offers healing
    assert "costs quality" in printed and "x1.46" in printed and "--heal-steps" in printed
    hf = json.loads((out / "config.json").read_text())
    assert hf["model_type"] == "ladder_llama" and hf["ladder_layers"] == 3
    assert hf["jaxturbo"] == {"residual_mode": "hybrid", "ladder_layers": 3}
    assert set(hf["auto_map"]) >= {"AutoConfig", "AutoModelForCausalLM"}
    for name in hf["auto_map"].values():
        assert (out / f"{name.split('.')[0]}.py").is_file()
    a, b = read_hf_tensors(src_dir), read_hf_tensors(out)
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    cfg, _, _ = load_hf(out)  # loadable back, as the ladder model
    assert (cfg.residual_mode, cfg.ladder_layers) == ("hybrid", 3)


@pytest.mark.parametrize("n", [5, -1])
def test_ladderize_bad_layers(src_dir, tmp_path, capsys, n):
    out = tmp_path / "never"
    assert (
        main(["ladderize", "--model", str(src_dir), "--ladder-layers", str(n), "--out", str(out)])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"--ladder-layers {n}" in err and "[0, 4]" in err
    assert not out.exists()


@pytest.mark.parametrize(
    "flag, value, says",
    [
        ("--heal-steps", "-3", ">= 0"),
        ("--heal-len", "0", ">= 1"),
        ("--heal-lr", "0", "> 0"),
        ("--eval-tokens", "-1", ">= 0"),
    ],
)
def test_ladderize_bad_heal_values(src_dir, tmp_path, capsys, flag, value, says):
    out = tmp_path / "never"
    assert (
        main(
            [
                "ladderize",
                "--model",
                str(src_dir),
                "--ladder-layers",
                "2",
                "--out",
                str(out),
                flag,
                value,
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{flag} {value}" in err and says in err
    assert not out.exists()


def test_help_states_the_quality_cost_and_the_data_split(capsys):
    with pytest.raises(SystemExit):
        main(["ladderize", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse re-wraps the lines
    assert "costs quality" in text and "x1.46 with 8" in text and "x3.4 with 15" in text
    assert "--heal-steps" in text and "never reads" in text and "WikiText-2" in text


def test_the_quality_cost_quoted_is_the_measured_one():
    """x1.46 (N = 8) and x3.4 (N = 15) in --help and the output are the results file's ratios."""
    md = (
        Path(__file__).resolve().parents[2]
        / "experiments"
        / "ladderize"
        / "results"
        / "ppl_smollm2-135m.md"
    ).read_text()
    ratio = {
        int(m[0]): float(m[1]) for m in re.findall(r"^\| (\d+) \| [^|]+ \| ([\d.]+) \|", md, re.M)
    }
    # the file gives 3 decimals (1.465): the quoted figure is it at 2, within half a unit
    assert abs(ratio[8] - 1.46) <= 0.005 + 1e-9 and abs(ratio[15] - 3.4) <= 0.05, ratio


def test_ladderize_without_tokenizer_needs_eval_tokens_0(src_dir, tmp_path, capsys):
    """Scoring needs a tokenizer: the default (a perplexity) on a directory without one is a
    one-line error naming the way to convert without it."""
    out = tmp_path / "never"
    assert main(["ladderize", "--model", str(src_dir), "--layers", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no tokenizer" in err and "--eval-tokens 0" in err
    assert not out.exists()


def test_ladderize_checks_the_params_against_the_config():
    params = _random_params(CFG)
    assert ladderize(params, CFG, 2) == CFG.replace(residual_mode="hybrid", ladder_layers=2)
    with pytest.raises(UserError, match="the params hold 4 layers, the config 5"):
        ladderize(params, CFG.replace(num_hidden_layers=5), 2)


def _kl(teacher_logits, student_logits) -> float:
    """Mean over tokens of KL(teacher || student), in float64 numpy."""
    lt, ls = (
        x - np.logaddexp.reduce(x, -1, keepdims=True)
        for x in (np.asarray(teacher_logits, np.float64), np.asarray(student_logits, np.float64))
    )
    return float(np.mean(np.sum(np.exp(lt) * (lt - ls), -1)))


def test_healing_moves_the_student_toward_the_teacher_on_its_training_batch():
    """Every layer ladder on a random Llama whose modules dominate the residual stream (o/down
    x8) and whose logits are sharp (untied head x30), so the conversion has a real KL gap.
    Healing on ONE batch (cycled): the first step's loss is KL(original || ladder) on that
    batch before any update (float64 numpy reference), and after 6 steps the KL on the same
    batch is lower (0.209 -> 0.051 when written; float32 CPU, fixed seeds)."""
    cfg = CFG.replace(tie_word_embeddings=False)
    p = init_params(cfg, jax.random.key(0))
    layers = {
        **p["layers"],
        "self_attn.o_proj.weight": p["layers"]["self_attn.o_proj.weight"] * 8.0,
        "mlp.down_proj.weight": p["layers"]["mlp.down_proj.weight"] * 8.0,
    }
    teacher = jax.tree.map(
        np.asarray, {**p, "layers": layers, "lm_head.weight": p["lm_head.weight"] * 30.0}
    )
    tokens = np.random.RandomState(0).randint(0, 96, 4 * 32).astype(np.int32)
    batches = heal_batches(tokens, 6, 4, 32)
    assert len(batches) == 1  # the text holds one batch: every step trains on it
    ladder = ladderize(teacher, cfg, 4)
    t_logits = forward(teacher, cfg, jnp.asarray(batches[0]))[0]

    def batch_kl(params) -> float:
        s_logits = forward(jax.tree.map(jnp.asarray, params), ladder, jnp.asarray(batches[0]))[0]
        return _kl(t_logits, s_logits)

    before = batch_kl(teacher)
    res = heal(teacher, ladder, cfg, batches, steps=6, lr=1e-4, progress=False)
    after = batch_kl(res.params)
    assert before > 0.1, before  # the conversion left something to heal
    np.testing.assert_allclose(res.history[0]["loss"], before, rtol=1e-4)
    assert after < 0.8 * before, (before, after)
    assert [r["step"] for r in res.history] == list(range(1, 7))


def test_ladderize_cli_heals_on_tokens_it_never_scores(
    src_with_tokenizer, tmp_path, capsys, monkeypatch
):
    """`--heal-steps 2` end to end.  The text is lowercase but for its last 64 characters
    (uppercase, one token each): every perplexity must score exactly those, no heal token may
    be one of them, and the exported directory, read back, scores the printed healed
    perplexity (it holds the healed weights, not the converted ones)."""
    import jaxturbo.convert.ladderize as ladderize_mod
    import jaxturbo.inference as inference
    from jaxturbo.inference.scoring import perplexity

    seen: dict[str, list[np.ndarray]] = {"heal": [], "eval": []}
    real_heal, real_ppl = ladderize_mod.heal, inference.perplexity

    def spy_heal(params, ladder_cfg, teacher_cfg, batches, **kw):
        seen["heal"] += batches
        return real_heal(params, ladder_cfg, teacher_cfg, batches, **kw)

    def spy_ppl(params, cfg, ids, **kw):
        seen["eval"].append(np.asarray(ids))
        return real_ppl(params, cfg, ids, **kw)

    monkeypatch.setattr(ladderize_mod, "heal", spy_heal)
    monkeypatch.setattr(inference, "perplexity", spy_ppl)

    body = ("abcdefghijklmnopqrstuvwxyz" * 5)[:128]
    tail = ("ABCDEFGHIJKLMNOPQRSTUVWXYZ" * 3)[:64]
    data = tmp_path / "text.txt"
    data.write_text(body + tail)
    out = tmp_path / "healed"
    code = main(
        [
            "ladderize",
            "--model",
            str(src_with_tokenizer),
            "--ladder-layers",
            "2",
            "--out",
            str(out),
            "--heal-data",
            str(data),
            "--heal-steps",
            "2",
            "--heal-batch",
            "2",
            "--heal-len",
            "16",
            "--heal-lr",
            "1e-3",
            "--eval-tokens",
            "64",
            "--eval-window",
            "32",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    for stage in ("before conversion", "after conversion", "after healing"):
        assert stage in printed, printed
    # the output names the token ranges: trained on [0, 64), scored [128, 192), held out
    assert "trained on tokens [0, 64)" in printed and "tokens [128, 192)" in printed
    assert "held out" in printed and "costs quality" not in printed

    tail_ids = char_tokenizer().encode(tail, add_special_tokens=False)
    assert len(seen["eval"]) == 3  # before, converted, healed
    assert all(list(ids) == tail_ids for ids in seen["eval"])
    healed_on = np.concatenate([b.ravel() for b in seen["heal"]])
    assert healed_on.size == 2 * 2 * 16 and not set(tail_ids) & set(healed_on.tolist())
    summary = json.loads((out / "ladder_conversion.json").read_text())
    assert summary["data_tokens"] == {"heal": [0, 64], "evaluation": [128, 192]}
    assert summary["heal_tokens"] == 64
    metrics = (out / "heal" / "metrics.jsonl").read_text()
    records = [json.loads(line) for line in metrics.splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2]

    cfg, params, _ = load_hf(out)
    assert (cfg.residual_mode, cfg.ladder_layers) == ("hybrid", 2)
    scored = perplexity(params, cfg, np.asarray(tail_ids, np.int32), window=32).perplexity
    np.testing.assert_allclose(scored, summary["ppl_healed"], rtol=1e-5)
    assert abs(summary["ppl_healed"] - summary["ppl_converted"]) > 1e-3  # the weights moved
