"""The README's library snippet runs as written (on the real SmolLM2, in a temporary directory)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def library_snippet() -> str:
    """The ```python block of the README's "## Library" section."""
    text = README.read_text()
    section = text[text.index("## Library") :]
    section = section[: section.index("\n## ", 1)]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the Library section should hold one python block"
    return blocks[0]


@pytest.mark.slow
def test_readme_library_snippet_runs(tmp_path, monkeypatch, capsys, smollm2_dir):
    # smollm2_dir: the snippet's load_model("smollm2-135m") finds the run's conversion, made once
    # under the suite's file lock, instead of converting again beside another worker
    monkeypatch.chdir(tmp_path)  # what the snippet writes stays under the test's directory
    # The engine compiles the step shapes the snippet's two requests use, as it meets them,
    # instead of warming up every (token bucket, sequence bucket, sampling) shape first: on the
    # 135M model that is ~18 programs of about a second each, and a cold cache compiles them.
    # The warm-up itself (every shape, then no compilation) is test_engine_compile's.
    from jaxturbo.inference.engine.model_runner import ModelRunner

    monkeypatch.setattr(ModelRunner, "warmup", lambda self, *a, **kw: 0)
    exec(compile(library_snippet(), str(README), "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out.splitlines()
    texts, engine_texts, ppl = out[-3:]
    assert texts.startswith("[") and engine_texts.startswith("[")
    assert 1.0 < float(ppl) < 100.0  # SmolLM2 on WikiText-2 scores ~20-30
    assert (tmp_path / "smollm2-hf" / "config.json").is_file()
