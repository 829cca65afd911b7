"""The vllm rollout engine: a clear refusal where vllm is missing; where it is installed (a GPU
machine), logprobs and greedy tokens against the JAX engine after `update_weights`."""

from __future__ import annotations

import numpy as np
import pytest

from jaxturbo.errors import UserError


def test_vllm_engine_refuses_without_vllm(monkeypatch):
    import jaxturbo.rl.rollout as rollout

    monkeypatch.setattr(rollout, "vllm_available", lambda: False)
    with pytest.raises(UserError, match="vllm is not installed"):
        rollout.VLLMEngine(None, None, model_dir="unused")


def test_vllm_engine_matches_jax_engine(tmp_path):
    pytest.importorskip("vllm", reason="vllm is not installed (GPU-only optional dependency)")
    import jax

    from jaxturbo.bridge import export_hf
    from jaxturbo.generate.sampling import SamplingParams
    from jaxturbo.rl.rollout import JaxEngine, VLLMEngine
    from tests.hf_tiny import tiny_hf_model

    _, cfg, params = tiny_hf_model("llama")
    d = export_hf(params, cfg, tmp_path / "tiny")
    # the engine starts from the exported weights; update_weights then loads other ones
    moved = jax.tree.map(lambda x: x * 1.01, params)
    vl, jx = VLLMEngine(cfg, params, model_dir=str(d)), JaxEngine(cfg, moved)
    vl.update_weights(moved)
    prompts = [[1, 5, 9, 20], [3, 4]]
    g_v = vl.generate(prompts, SamplingParams(temperature=0.0), max_new_tokens=6)
    g_j = jx.generate(prompts, SamplingParams(temperature=0.0), max_new_tokens=6)
    assert g_v.completions == g_j.completions
    for a, b in zip(vl.score(prompts, g_j.completions), jx.score(prompts, g_j.completions)):
        np.testing.assert_allclose(a, b, atol=1e-3)
