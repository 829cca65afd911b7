"""experiments/mla/conversion.py --rope-study on CPU: a random GQA model of the `tiny` shape
stands in for SmolLM2; each budget gets one care-uniform row per RoPE (layout, criterion),
written as .json and .md."""

from __future__ import annotations

import json

import jax

from experiments.mla import conversion
from jaxturbo.models.init import init_params
from jaxturbo.models.shapes import shape

V = 101
CFG = shape("tiny", vocab_size=V, num_hidden_layers=2)


class _CharTokenizer:
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) % V for c in text]


def test_rope_study_writes_one_row_per_layout_and_criterion(tmp_path, monkeypatch):
    params = init_params(CFG, jax.random.key(0))
    monkeypatch.setattr(conversion, "load_model", lambda *a, **kw: (CFG, params, _CharTokenizer()))
    data = tmp_path / "text.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    out = tmp_path / "rope"
    conversion.main(
        ["--preset", "tiny", "--rope-study", "--budgets", "0.5", "--data", str(data)]
        + ["--out", str(out)]
    )
    rows = json.loads((tmp_path / "rope.json").read_text())
    assert [(r["budget"], r["layout"], r["criterion"]) for r in rows] == [
        (0.5, layout, crit) for layout, crit in conversion.ROPE_CHOICES
    ]
    assert all(r["ppl"] > 1.0 and len(r["rope_freq_index"]) for r in rows)
    md = (tmp_path / "rope.md").read_text()
    assert md.count("| 0.5 |") == 3 and "| free | rotation |" in md
