"""`generate --mesh` and `ppl --mesh`: tensor-parallel SmolLM2 gives the single-device answer.

SmolLM2 has 9 query / 3 KV heads, so the tensor size must divide 9 and 3: the test runs the CLI
in a subprocess with 3 fake CPU devices (the suite's own process has 8)."""

import subprocess
import sys
from pathlib import Path

from jaxturbo.data import WIKITEXT2_VALID
from tests.helpers import cpu_env

REPO = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import contextlib, io, sys
from jaxturbo.cli import main
from jaxturbo.data import WIKITEXT2_VALID
def run(*argv):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(list(argv))
    return code, buf.getvalue()
gen = ["generate", "--model", sys.argv[1], "--prompt", "The capital of France is",
       "--max-new-tokens", "8", "--no-stream"]
ppl = ["ppl", "--model", sys.argv[1], "--data", sys.argv[2], "--max-tokens", "300",
       "--window", "128", "--windows-per-batch", "3"]
for argv in (gen, gen + ["--mesh", "tensor=3"], ppl, ppl + ["--mesh", "tensor=3"]):
    code, out = run(*argv)
    print(f"=== {code}")
    print(out)
code, _ = run(*(gen + ["--mesh", "tensor=2,data=1,fsdp=1,sequence=1"]))
print(f"=== bad {code}")
"""


def test_tensor_parallel_cli_equals_single_device(smollm2_dir, tmp_path):
    env = cpu_env(3)
    data = WIKITEXT2_VALID
    r = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(smollm2_dir), str(data)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    parts = r.stdout.split("=== ")[1:]
    codes = [p.split("\n", 1)[0] for p in parts]
    outs = [p.split("\n", 1)[1].strip() for p in parts]
    assert codes[:4] == ["0"] * 4, r.stdout
    assert outs[0] == outs[1] and "Paris" in outs[0], outs[:2]
    p1, p3 = (float(o.rsplit("perplexity:", 1)[1]) for o in outs[2:4])
    assert abs(p1 - p3) <= 1e-4 * p1, (p1, p3)
    # tensor=2 needs 2 devices (3 present) and does not divide 9 heads: a one-line error, exit 2
    assert codes[4] == "bad 2"
    assert "Traceback" not in r.stderr
