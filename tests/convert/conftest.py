"""Fixtures of the MLA tests: the real SmolLM2 converted once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smollm2_mla_dir(smollm2_dir, tmp_path_factory) -> Path:
    """The real SmolLM2-135M-Instruct converted by `jaxturbo convert-mla` (care, adjusted ranks:
    per-layer latents padded to kv_lora_rank, half the KV cache, 4 x 128 calibration tokens, no
    evaluation): a DeepSeek-V3 directory.  About two minutes on a 2-core CPU, paid once."""
    from jaxturbo.cli import main

    out = tmp_path_factory.mktemp("smollm2-mla") / "mla"
    code = main(
        [
            "convert-mla",
            "--model",
            str(smollm2_dir),
            "--out",
            str(out),
            "--method",
            "care",
            "--ranks",
            "adjusted",
            "--kv-budget",
            "0.5",
            "--calib-samples",
            "4",
            "--calib-len",
            "128",
            "--eval-tokens",
            "0",
        ]
    )
    assert code == 0
    return out
