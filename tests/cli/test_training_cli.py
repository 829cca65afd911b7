"""`jaxturbo sft` end to end on a tiny random Llama, with a --config file the command line
overrides, the resolved config.yaml, metrics, TensorBoard and held-in evaluation; the final HF
directory and `jaxturbo export-hf --checkpoint` load in transformers with the logits of the
checkpoint's params.  Plus the CLI's conventions: --version, every flag's help with its default,
one meaning per flag name, library errors in flag names."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import yaml

from jaxturbo.cli import build_parser, main
from jaxturbo.cli.common import expand_config, flag_names
from tests.rl.test_cli_rl import (
    TOKENS,
    checkpoint_logits,
    hf_logits,
    tiny_rl_model,  # noqa: F401  (the tiny model fixture)
)


def _sub(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    return parser._subparsers._group_actions[0].choices[name]


def test_sft_config_file_export_and_export_from_checkpoint(tiny_rl_model, tmp_path, capsys):  # noqa: F811
    data = tmp_path / "sums.txt"
    data.write_text("\n\n".join(f"{a}+{b}={a + b}" for a in range(6) for b in range(5)))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "steps": 5,
                "batch-size": 2,
                "seq_len": 16,
                "--lr": 0.01,
                "save_every": 2,
                "eval-tokens": 24,
                "no_export": False,
                "compute_dtype": "float32",
            }
        )
    )
    out = tmp_path / "run"
    # the command line's --steps 2 wins over the file's 5
    assert (
        main(
            [
                "sft",
                "--model",
                str(tiny_rl_model),
                "--data",
                str(data),
                "--out",
                str(out),
                "--config",
                str(cfg),
                "--steps",
                "2",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["steps"] == 2 and resolved["batch_size"] == 2 and resolved["lr"] == 0.01
    assert resolved["eval_tokens"] == 24 and resolved["model"] == str(tiny_rl_model)
    # config.yaml reads back to the same flags
    sft = _sub(build_parser(), "sft")
    again = vars(sft.parse_args(expand_config(sft, ["--config", str(out / "config.yaml")])))
    assert {k: again[k] for k in resolved} == resolved

    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in recs] == [
        ("eval", 0),
        ("train", 1),
        ("train", 2),
        ("eval", 2),
    ]
    ev = json.loads((out / "eval.json").read_text())
    assert ev["held_in_tokens"] == 24 and ev["before"] == recs[0]["held_in_perplexity"]
    assert ev["after"] == recs[-1]["held_in_perplexity"] != ev["before"]
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["2"]
    assert (out / "loss.png").stat().st_size > 0 and "held-in perplexity" in err

    # the final HF directory and an export of the checkpoint (tokenizer: the run's copy) give
    # the checkpoint's logits in transformers
    ours = checkpoint_logits(out, TOKENS)
    np.testing.assert_allclose(hf_logits(out / "hf", TOKENS), ours, atol=1e-4, rtol=0)
    assert main(["export-hf", "--checkpoint", str(out), "--out", str(tmp_path / "exp")]) == 0
    np.testing.assert_allclose(hf_logits(tmp_path / "exp", TOKENS), ours, atol=1e-4, rtol=0)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "exp")
    assert tok.decode(tok.encode("1+2=3", add_special_tokens=False)) == "1+2=3"


def test_config_file_refusals(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stepz: 3\nbatch_size: 2\n")
    assert main(["sft", "--config", str(bad), "--model", "m", "--data", "d", "--out", "o"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown keys stepz" in err
    assert "valid keys:" in err and "batch_size" in err and "steps" in err
    switch = tmp_path / "switch.yaml"
    switch.write_text("resume: 3\n")
    assert main(["rl", "--config", str(switch), "--model", "m", "--steps", "1", "--out", "o"]) == 2
    assert "resume is a switch" in capsys.readouterr().err


def test_version(capsys):
    from jaxturbo import __version__

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"jaxturbo {__version__}"


def test_every_flag_has_help_showing_its_default():
    parser = build_parser()
    for name, sub in parser._subparsers._group_actions[0].choices.items():
        fmt = sub._get_formatter()
        for a in sub._actions:
            if not a.option_strings or a.dest == "help":
                continue
            assert a.help, f"{name} {a.option_strings[0]} has no help"
            shown = fmt._expand_help(a)
            if a.nargs != 0 and not a.required:  # switches are off; required flags have none
                assert "default" in shown, f"{name} {a.option_strings[0]}: {shown!r}"


def test_one_meaning_per_flag_name():
    commands = _sub_all()
    dtype_helps = {c: _help(p, "--dtype") for c, p in commands.items() if _help(p, "--dtype")}
    assert set(dtype_helps) == {"generate", "ppl", "export-hf", "ladderize", "serve"}
    assert all(
        h.startswith("parameter and compute dtype: the weights are cast to it")
        for h in dtype_helps.values()
    )
    assert {c for c, p in commands.items() if _help(p, "--compute-dtype")} == {"sft", "rl"}
    assert {c for c, p in commands.items() if _help(p, "--batch-size")} == {"sft"}
    assert "windows per forward pass" in _help(commands["ppl"], "--windows-per-batch")
    assert {c for c, p in commands.items() if _help(p, "--eval-tokens")} == {
        "sft",
        "convert-mla",
        "ladderize",
    }
    assert {c for c, p in commands.items() if _help(p, "--config")} == {"sft", "rl"}
    for flag in (
        "--save-every",
        "--keep",
        "--resume",
        "--no-checkpoint",
        "--no-export",
        "--seed",
        "--eval-every",
    ):
        assert _help(commands["sft"], flag) and _help(commands["rl"], flag), flag
    for flag in ("--save-every", "--no-checkpoint", "--resume", "--no-export"):
        assert _help(commands["sft"], flag) == _help(commands["rl"], flag), flag


def _sub_all() -> dict[str, argparse.ArgumentParser]:
    return dict(build_parser()._subparsers._group_actions[0].choices)


def _help(p: argparse.ArgumentParser, flag: str) -> str | None:
    return next((a.help for a in p._actions if flag in a.option_strings), None)


def test_library_errors_are_shown_in_flag_names():
    rl = _sub_all()["rl"]
    assert flag_names("group_size=1 must be >= 2 for grpo", rl) == (
        "--group-size 1 must be >= 2 for grpo"
    )
    assert flag_names("async_rollouts=True is implemented for algo=grpo only", rl) == (
        "--async is implemented for --algo grpo only"
    )
    # only whole names: compute_dtype= is not dtype=; unknown names stay
    assert flag_names("compute_dtype=x and hidden_size=3", rl) == (
        "--compute-dtype x and hidden_size=3"
    )
