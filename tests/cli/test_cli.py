"""The CLI as a user meets it: help lists every command; bad input is one line, exit 2."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jaxturbo.cli import main
from jaxturbo.data import WIKITEXT2_VALID

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory) -> Path:
    """A tiny random Llama saved by transformers (sharded safetensors, no tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    hc = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=211,
        max_position_embeddings=256,
    )
    d = tmp_path_factory.mktemp("cli") / "llama-tiny"
    AutoModelForCausalLM.from_config(hc).save_pretrained(d, max_shard_size="40KB")
    return d


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *needles):
    assert code == 2
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


def test_help_lists_every_command():
    out = subprocess.run(
        [sys.executable, "-m", "jaxturbo.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for cmd in ("generate", "ppl", "export-hf"):
        assert cmd in out


def test_subprocesses_cache_under_the_test_run(run_cache_root):
    # conftest points JAXTURBO_CACHE (and the other caches) at the run's temp root; a child
    # process (a CLI run, a notebook kernel) inherits it instead of writing ~/.cache/jaxturbo
    code = "from jaxturbo.bridge.registry import cache_dir; print(cache_dir())"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert Path(out) == run_cache_root / "jaxturbo-cache"


def test_unknown_model(capsys):
    code, _, err = run_cli(capsys, "generate", "--model", "no-such-model", "--prompt", "hi")
    assert_one_line_error(code, err, "no-such-model", "smollm2-135m")


def test_missing_weights(capsys, tmp_path, tiny_hf_dir):
    d = tmp_path / "m"
    shutil.copytree(tiny_hf_dir, d)
    for f in d.glob("*.safetensors"):
        f.unlink()
    code, _, err = run_cli(capsys, "ppl", "--model", str(d), "--data", str(WIKITEXT2_VALID))
    assert_one_line_error(code, err)


def test_truncated_weights(capsys, tmp_path, tiny_hf_dir):
    d = tmp_path / "m"
    shutil.copytree(tiny_hf_dir, d)
    shard = sorted(d.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    code, _, err = run_cli(capsys, "export-hf", "--model", str(d), "--out", str(tmp_path / "out"))
    assert_one_line_error(code, err)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_unsupported_architecture(capsys, tmp_path, tiny_hf_dir):
    d = tmp_path / "m"
    shutil.copytree(tiny_hf_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (d / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(capsys, "export-hf", "--model", str(d), "--out", str(tmp_path / "out"))
    assert_one_line_error(code, err, "mamba", "llama")
    assert not (tmp_path / "out").exists()


def test_shape_mismatch(capsys, tmp_path, tiny_hf_dir):
    d = tmp_path / "m"
    shutil.copytree(tiny_hf_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (d / "config.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(capsys, "export-hf", "--model", str(d), "--out", str(tmp_path / "out"))
    assert_one_line_error(code, err, "mlp")
    assert not (tmp_path / "out").exists()


def test_empty_data_and_window_too_large(capsys, tmp_path, tiny_hf_dir, smollm2_dir):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    code, _, err = run_cli(capsys, "ppl", "--model", str(tiny_hf_dir), "--data", str(empty))
    assert_one_line_error(code, err, "empty")
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 50)
    code, _, err = run_cli(
        capsys, "ppl", "--model", str(smollm2_dir), "--data", str(text), "--window", "100000"
    )
    assert_one_line_error(code, err, "100000", "8192")


def test_bad_mesh_spec():
    from jaxturbo.errors import UserError
    from jaxturbo.parallel.mesh import make_mesh

    with pytest.raises(UserError, match="cpu-8"):
        make_mesh("no-such-preset")
    with pytest.raises(UserError, match="needs 6 devices"):
        make_mesh("tensor=3,data=2")
