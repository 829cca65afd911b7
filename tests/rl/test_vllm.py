"""The vllm rollout engine.  vLLM cannot be installed here, so the adapter (`VLLMEngine`) runs
against a stand-in `vllm` module whose `LLM` is a transformers model behind vLLM's offline
interface (token-id requests, per-request `SamplingParams`, `apply_model`/`load_weights`,
outputs with per-token `Logprob` dicts, `prompt_logprobs`): the weight-sync payload, the request
format, the parsing of outputs and scores, the refusals and the CLI wiring are checked for real.
One test needs vLLM itself and is skipped where it is missing."""

from __future__ import annotations

import sys
import types

import jax
import numpy as np
import pytest

from jaxturbo.errors import UserError
from jaxturbo.inference.sampling import SamplingParams


class FakeLogprob:
    def __init__(self, logprob: float):
        self.logprob = logprob


class FakeSamplingParams:
    """Records its keyword arguments, as attributes too (vllm.SamplingParams' fields)."""

    def __init__(self, **kw):
        self.kw = kw
        self.__dict__.update(kw)


class FakeModel:
    """What vLLM hands to `apply_model`'s function: a model whose `load_weights` takes
    (HF checkpoint name, tensor) pairs and refuses names it does not have."""

    def __init__(self, hf):
        self.hf, self.loads = hf, []

    def load_weights(self, weights):
        weights = list(weights)
        self.loads.append(weights)
        missing, unexpected = self.hf.load_state_dict(dict(weights), strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
        self.hf.tie_weights()


class FakeOldLLM:
    """vllm.LLM of the older in-process engine (no apply_model): token ids in, vLLM-shaped
    outputs out, computed with the transformers model of `model` (an HF directory)."""

    def __init__(self, model, dtype="auto", seed=0, **kw):
        import torch
        from transformers import AutoModelForCausalLM

        self.init = dict(model=model, dtype=dtype, seed=seed, **kw)
        hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        self._model = FakeModel(hf)
        runner = types.SimpleNamespace(model=self._model)
        self.llm_engine = types.SimpleNamespace(
            model_executor=types.SimpleNamespace(
                driver_worker=types.SimpleNamespace(model_runner=runner)
            )
        )
        self.calls, self.prefix_resets = [], 0

    def reset_prefix_cache(self):
        self.prefix_resets += 1

    def _logprobs(self, ids):
        import torch

        with torch.no_grad():
            logits = self._model.hf(torch.tensor([ids])).logits[0].float()
        return torch.log_softmax(logits, -1)

    def generate(self, reqs, sps, use_tqdm=True):
        import torch

        sps = sps if isinstance(sps, list) else [sps] * len(reqs)
        self.calls.append((reqs, sps))
        outs = []
        for req, sp in zip(reqs, sps):
            ids = list(req["prompt_token_ids"])
            if getattr(sp, "prompt_logprobs", None) == 0:  # scoring: logprobs of the prompt
                lp = self._logprobs(ids)
                plp = [None] + [
                    {t: FakeLogprob(float(lp[i - 1, t]))} for i, t in enumerate(ids) if i > 0
                ]
                outs.append(types.SimpleNamespace(prompt_logprobs=plp, outputs=[]))
                continue
            assert sp.top_p == 1.0 and sp.top_k == -1 and sp.ignore_eos and sp.logprobs == 0
            gen = torch.Generator().manual_seed(sp.seed)
            toks, lps = [], []
            for _ in range(sp.max_tokens):
                lp = self._logprobs(ids + toks)[-1]
                t = (
                    int(lp.argmax())
                    if sp.temperature == 0
                    else int(
                        torch.multinomial(torch.softmax(lp / sp.temperature, -1), 1, generator=gen)
                    )
                )
                toks.append(t)
                lps.append({t: FakeLogprob(float(lp[t]))})
                if t in sp.stop_token_ids:
                    break
            outs.append(
                types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=toks, logprobs=lps)])
            )
        return outs


class FakeLLM(FakeOldLLM):
    """vllm.LLM of the newer engine: weights are reached through apply_model."""

    def apply_model(self, fn):
        return [fn(self._model)]


@pytest.fixture
def fake_vllm(monkeypatch):
    import jaxturbo.rl.rollout as rollout

    mod = types.ModuleType("vllm")
    mod.LLM, mod.SamplingParams = FakeLLM, FakeSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", mod)
    monkeypatch.setattr(rollout, "vllm_available", lambda: True)
    return mod


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """(torch model, ModelConfig, params, HF directory) of a tiny random Llama (tied head)."""
    from jaxturbo.bridge import export_hf
    from tests.helpers.hf_tiny import tiny_hf_model

    hf, cfg, params = tiny_hf_model("llama")
    return hf, cfg, params, export_hf(params, cfg, tmp_path_factory.mktemp("vllm") / "tiny")


PROMPTS = [[1, 5, 9, 20], [3, 4]]


def _moved(params):
    return jax.tree.map(lambda x: x * 1.01, params)


@pytest.mark.parametrize("llm_class", [FakeLLM, FakeOldLLM])
def test_weight_sync_payload_is_the_hf_state_dict(tiny_dir, fake_vllm, llm_class):
    import torch

    from jaxturbo.rl.rollout import VLLMEngine

    fake_vllm.LLM = llm_class
    hf, cfg, params, d = tiny_dir
    eng = VLLMEngine(cfg, params, model_dir=str(d), seed=3, gpu_memory_utilization=0.5)
    assert eng.llm.init == dict(
        model=str(d), dtype="float32", seed=3, gpu_memory_utilization=0.5, skip_tokenizer_init=True
    )
    eng.update_weights(_moved(params))
    loads = eng.llm._model.loads
    assert len(loads) == 2 and eng.llm.prefix_resets == 2  # KV blocks of old weights dropped
    # the payload is transformers' own state dict (the tied head is the embedding), float32
    want = {
        k: v.detach().float().numpy() for k, v in hf.state_dict().items() if k != "lm_head.weight"
    }
    for load, scale in zip(loads, (1.0, 1.01)):
        got = dict(load)
        assert sorted(got) == sorted(want)
        for k, v in got.items():
            assert v.dtype == torch.float32, k
            np.testing.assert_allclose(v.numpy(), want[k] * np.float32(scale), rtol=1e-6, err_msg=k)


def test_adapter_matches_jax_engine_through_fake_llm(tiny_dir, fake_vllm):
    from jaxturbo.rl.rollout import JaxEngine, VLLMEngine

    _, cfg, params, d = tiny_dir
    moved = _moved(params)
    vl, jx = VLLMEngine(cfg, params, model_dir=str(d)), JaxEngine(cfg, moved)
    vl.update_weights(moved)
    g_v = vl.generate(PROMPTS, SamplingParams(temperature=0.0), max_new_tokens=6)
    g_j = jx.generate(PROMPTS, SamplingParams(temperature=0.0), max_new_tokens=6)
    assert g_v.completions == g_j.completions and g_v.truncated == g_j.truncated == [True] * 2
    for a, b in zip(g_v.logprobs, g_j.logprobs):
        assert a.dtype == np.float32
        np.testing.assert_allclose(a, b, atol=1e-4)
    for a, b in zip(vl.score(PROMPTS, g_j.completions), jx.score(PROMPTS, g_j.completions)):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_request_format_and_output_parsing(tiny_dir, fake_vllm):
    from jaxturbo.rl.rollout import VLLMEngine

    _, cfg, params, d = tiny_dir
    eng = VLLMEngine(cfg, None, model_dir=str(d))
    canned = [([7, 8, 9], [-0.5, -1.5, -2.5]), ([6, 4], [-0.25, -0.75])]

    def fake_generate(reqs, sps, use_tqdm=True):
        eng.llm.calls.append((reqs, sps))
        return [
            types.SimpleNamespace(
                outputs=[
                    types.SimpleNamespace(
                        token_ids=t,
                        logprobs=[
                            {x: FakeLogprob(v), x + 1: FakeLogprob(-9.0)} for x, v in zip(t, lp)
                        ],
                    )
                ]
            )
            for t, lp in canned
        ]

    eng.llm.generate = fake_generate
    out = eng.generate(
        PROMPTS,
        SamplingParams(temperature=1.0, top_p=0.9, top_k=5),
        max_new_tokens=3,
        stop_ids=(4, 9),
        seed=2,
    )
    reqs, sps = eng.llm.calls[-1]
    assert reqs == [{"prompt_token_ids": [1, 5, 9, 20]}, {"prompt_token_ids": [3, 4]}]
    # one SamplingParams per request, seeds distinct across the batch (a group repeats its
    # prompt) and across calls (seed * batch + row)
    assert [sp.kw for sp in sps] == [
        dict(
            temperature=1.0,
            top_p=0.9,
            top_k=5,
            max_tokens=3,
            stop_token_ids=[4, 9],
            ignore_eos=True,
            logprobs=0,
            seed=s,
        )
        for s in (4, 5)
    ]
    # the sampled token's logprob is picked out of each position's dict
    assert out.completions == [[7, 8, 9], [6, 4]]
    np.testing.assert_array_equal(out.logprobs[0], np.float32([-0.5, -1.5, -2.5]))
    np.testing.assert_array_equal(out.logprobs[1], np.float32([-0.25, -0.75]))
    # 3 tokens ending in stop id 9: not truncated; [6, 4] stopped early
    assert out.truncated == [False, False]
    canned[1] = ([6, 5, 5], [-0.1] * 3)
    assert eng.generate(PROMPTS, SamplingParams(), max_new_tokens=3, stop_ids=(4, 9)).truncated == [
        False,
        True,
    ]
    greedy = eng.llm.calls[-1][1][0].kw
    assert (greedy["temperature"], greedy["top_p"], greedy["top_k"]) == (0.0, 1.0, -1)
    eng.generate(PROMPTS, SamplingParams(temperature=1.0, top_k=0), max_new_tokens=3)
    assert eng.llm.calls[-1][1][0].kw["top_k"] == -1  # 0 (off) is vLLM's -1

    # scoring: prompt + completion as one prompt, one new token, prompt logprobs from there on
    calls = []

    def fake_score(reqs, sp, use_tqdm=True):
        calls.append((reqs, sp))
        return [
            types.SimpleNamespace(
                prompt_logprobs=[None]
                + [{t: FakeLogprob(-0.1 * i)} for i, t in enumerate(r["prompt_token_ids"][1:], 1)]
            )
            for r in reqs
        ]

    eng.llm.generate = fake_score
    got = eng.score([[1, 2], [3]], [[5, 6], [7]])
    assert calls[0][0] == [{"prompt_token_ids": [1, 2, 5, 6]}, {"prompt_token_ids": [3, 7]}]
    assert calls[0][1].kw == dict(max_tokens=1, prompt_logprobs=0)
    np.testing.assert_allclose(got[0], [-0.2, -0.3], atol=1e-7)  # tokens 5, 6 at entries 2, 3
    np.testing.assert_allclose(got[1], [-0.1], atol=1e-7)


def test_unsupported_temperatures_are_refused(tiny_dir, fake_vllm):
    from jaxturbo.rl.rollout import VLLMEngine

    _, cfg, _, d = tiny_dir
    eng = VLLMEngine(cfg, None, model_dir=str(d))
    with pytest.raises(UserError, match="temperature 0.7 is not supported"):
        eng.generate(PROMPTS, SamplingParams(temperature=0.7), max_new_tokens=2)
    with pytest.raises(UserError, match="score at temperature 0.5 is not supported"):
        eng.score(PROMPTS, [[1], [2]], temperature=0.5)
    assert eng.llm.calls == []  # refused before anything reached the engine


def test_vllm_engine_refuses_without_vllm(monkeypatch):
    import jaxturbo.rl.rollout as rollout

    monkeypatch.setattr(rollout, "vllm_available", lambda: False)
    with pytest.raises(UserError, match="vllm is not installed"):
        rollout.VLLMEngine(None, None, model_dir="unused")


from tests.rl.test_cli_rl import _records, _rl, tiny_rl_model  # noqa: E402,F401  (fixture)


def test_rl_cli_with_the_vllm_engine(tiny_rl_model, fake_vllm, tmp_path, capsys):  # noqa: F811
    made = []

    class Recorded(FakeLLM):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

    fake_vllm.LLM = Recorded
    out = tmp_path / "run"
    assert (
        _rl(
            tiny_rl_model,
            out,
            "--rollout-engine",
            "vllm",
            "--steps",
            "2",
            "--eval-every",
            "0",
            "--max-operand",
            "1",
            "--eval-problems",
            "1",
            "--group-size",
            "8",
        )
        == 0
    )
    capsys.readouterr()
    (llm,) = made
    assert llm.init["model"] == str(tiny_rl_model) and llm.init["seed"] == 0
    train = _records(out, "train")
    assert [r["step"] for r in train] == [1, 2] and all(r["rollout_tokens"] > 0 for r in train)
    # every rollout and held-out request went through the stand-in engine; the weights were
    # loaded at the start and after each update
    n_rollout = sum(len(reqs) for reqs, sps in llm.calls if sps[0].temperature == 1.0)
    assert n_rollout == 2 * 4 * 8
    assert len(llm._model.loads) == 1 + sum("loss" in r for r in train)
    assert [r["step"] for r in _records(out, "eval")] == [0, 2]


def test_vllm_engine_matches_jax_engine(tmp_path):
    pytest.importorskip(
        "vllm",
        reason=(
            "vLLM is not installed (it cannot be installed on these machines).  With vLLM, this "
            "checks a real vllm.LLM behind VLLMEngine: after update_weights, greedy tokens equal "
            "JaxEngine's and prompt logprobs match it within 1e-3"
        ),
    )
    from jaxturbo.bridge import export_hf
    from jaxturbo.rl.rollout import JaxEngine, VLLMEngine
    from tests.helpers.hf_tiny import tiny_hf_model

    _, cfg, params = tiny_hf_model("llama")
    d = export_hf(params, cfg, tmp_path / "tiny")
    # the engine starts from the exported weights; update_weights then loads other ones
    moved = _moved(params)
    vl, jx = VLLMEngine(cfg, params, model_dir=str(d)), JaxEngine(cfg, moved)
    vl.update_weights(moved)
    g_v = vl.generate(PROMPTS, SamplingParams(temperature=0.0), max_new_tokens=6)
    g_j = jx.generate(PROMPTS, SamplingParams(temperature=0.0), max_new_tokens=6)
    assert g_v.completions == g_j.completions
    for a, b in zip(vl.score(PROMPTS, g_j.completions), jx.score(PROMPTS, g_j.completions)):
        np.testing.assert_allclose(a, b, atol=1e-3)
