"""`jaxturbo rl`: unsupported choices fail with one line before any model loads."""

from __future__ import annotations

import pytest

from jaxturbo.cli import main


@pytest.mark.parametrize("extra, needle", [
    (["--algo", "ppo", "--group-size", "0"], "--group-size >= 1 for ppo"),
    (["--rollout-engine", "vllm"], "vllm is not implemented"),
    (["--group-size", "1"], "--group-size >= 2 for grpo"),
    (["--algo", "ppo", "--async"], "--async is implemented for --algo grpo only"),
])
def test_rl_cli_refuses_unsupported(capsys, tmp_path, extra, needle):
    code = main(["rl", "--model", str(tmp_path / "no-such-model"), "--steps", "1",
                 "--out", str(tmp_path / "run"), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and needle in err and len(err.splitlines()) == 1
