"""`jaxturbo rl` end to end on a tiny random Llama with a character tokenizer: refusals, the
held-out curve (one compilation for all evaluations), no orbax import without checkpoints,
resume equal to an uninterrupted run, and refusal of an incompatible checkpoint."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxturbo.cli import main


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--algo", "ppo", "--group-size", "0"], "--group-size 0 must be >= 1 for ppo"),
        (["--rollout-engine", "vllm"], "vllm is not installed"),
        (["--group-size", "1"], "--group-size 1 must be >= 2 for grpo"),
        (["--algo", "ppo", "--async"], "--async is implemented for --algo grpo only"),
        (["--eval-every", "-1"], "--eval-every -1: must be >= 0"),
        (["--decode-steps", "0"], "--decode-steps 0: must be >= 1"),
        (["--resume", "--no-checkpoint"], "--resume needs checkpoints"),
        # operands in [0, 9], order ignored: 55 distinct sums, all of them held out
        (["--max-operand", "9", "--eval-problems", "55"], "held-out set of 55 problems"),
    ],
)
def test_rl_cli_refuses_unsupported(capsys, tmp_path, extra, needle, monkeypatch):
    if "vllm" in extra:
        monkeypatch.setitem(sys.modules, "vllm", None)  # even where vllm exists: not importable
        import jaxturbo.rl.rollout as rollout

        monkeypatch.setattr(rollout, "vllm_available", lambda: False)
    code = main(
        [
            "rl",
            "--model",
            str(tmp_path / "no-such-model"),
            "--steps",
            "1",
            "--out",
            str(tmp_path / "run"),
            *extra,
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and needle in err and len(err.splitlines()) == 1


@pytest.fixture(scope="module")
def tiny_rl_model(tmp_path_factory) -> Path:
    """A tiny random Llama whose tokenizer has one token per character of "a+b=N\\n"."""
    import torch
    from tokenizers import Tokenizer, decoders, models
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    vocab = {"<eos>": 0, **{c: i + 1 for i, c in enumerate("0123456789+=\n ")}}
    t = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))  # no merges: characters
    t.decoder = decoders.Fuse()
    torch.manual_seed(0)
    hc = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=len(vocab),
        max_position_embeddings=64,
        eos_token_id=0,
        bos_token_id=0,
    )
    d = tmp_path_factory.mktemp("rl") / "llama-chars"
    AutoModelForCausalLM.from_config(hc).save_pretrained(d)
    PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<eos>").save_pretrained(d)
    return d


# character ids of the tiny model's tokenizer, for logits comparisons
TOKENS = np.array([[3, 11, 5, 12, 8, 13, 1, 11, 2, 12, 4, 13]], np.int32)


def hf_logits(model_dir: Path, tokens: np.ndarray) -> np.ndarray:
    """transformers' float32 logits of an HF directory."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()


def checkpoint_logits(run: Path, tokens: np.ndarray, policy: bool = False) -> np.ndarray:
    """jaxturbo's logits with the params of a run's newest checkpoint (an rl ppo run's policy)."""
    import jax
    import jax.numpy as jnp

    from jaxturbo.models.config import ModelConfig
    from jaxturbo.models.transformer import forward
    from jaxturbo.train.checkpoint import read_params

    saved = read_params(run)
    params = saved.params["policy"] if policy else saved.params
    cfg = ModelConfig.from_hf_dict(saved.meta["model"])
    logits, _ = forward(
        jax.tree.map(jnp.asarray, params), cfg, jnp.asarray(tokens), attn_impl="xla"
    )
    return np.asarray(logits)


def _rl(model: Path, out: Path, *extra: str) -> int:
    return main(
        [
            "rl",
            "--model",
            str(model),
            "--out",
            str(out),
            "--prompts-per-step",
            "4",
            "--group-size",
            "4",
            "--max-new-tokens",
            "3",
            "--max-operand",
            "3",
            "--lr",
            "0.02",
            "--kl-coef",
            "0.01",
            "--eval-problems",
            "4",
            *extra,
        ]
    )


def _records(out: Path, kind: str) -> list[dict]:
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r.get("kind") == kind]


def test_rl_cli_eval_curve_one_compile_no_orbax(tiny_rl_model, tmp_path, monkeypatch, capsys):
    # with --no-checkpoint the run must not import orbax (absent on the GPU machine)
    for mod in ("orbax", "orbax.checkpoint", "jaxturbo.train.checkpoint"):
        monkeypatch.setitem(sys.modules, mod, None)
    import jax

    import jaxturbo.rl.grpo as grpo

    compiles, held, trained = [], [], []
    real, real_collect = grpo.mean_reward, grpo.collect_rollouts
    compiled = {"n": 0}

    def count_compiles(name, secs, **kw):
        compiled["n"] += name == "/jax/core/compile/backend_compile_duration"

    jax.monitoring.register_event_duration_secs_listener(count_compiles)

    def counted(engine, task, problems, **k):
        before = compiled["n"]
        r = real(engine, task, problems, **k)
        compiles.append(compiled["n"] - before)  # XLA compilations during this evaluation
        held.append([task.decode(p.prompt) for p in problems])
        return r

    def collect(engine, task, *a, **k):
        rollouts, m = real_collect(engine, task, *a, **k)
        trained.extend(task.decode(r.prompt) for r in rollouts)
        return rollouts, m

    monkeypatch.setattr(grpo, "mean_reward", counted)
    monkeypatch.setattr(grpo, "collect_rollouts", collect)
    out = tmp_path / "run"
    try:
        assert (
            _rl(
                tiny_rl_model,
                out,
                "--steps",
                "3",
                "--eval-every",
                "2",
                "--no-checkpoint",
                "--no-export",
            )
            == 0
        )
    finally:
        jax.monitoring.unregister_event_duration_listener(count_compiles)
    err = capsys.readouterr().err

    # every evaluation scores the same 4 distinct problems, and no training prompt is one of
    # them in either operand order ("a+b=" read back from the prompt text)
    def sums(texts):
        return {tuple(sorted(int(x) for x in t.strip().rstrip("=").split("+"))) for t in texts}

    assert len(held) == 3 and held[0] == held[1] == held[2] and len(sums(held[0])) == 4
    assert len(trained) == 3 * 4 * 4 and not sums(held[0]) & sums(trained)
    assert [r["step"] for r in _records(out, "eval")] == [0, 2, 3]
    assert [r["step"] for r in _records(out, "train")] == [1, 2, 3]
    assert compiles[0] > 0 and compiles[1:] == [0, 0], compiles  # later ones compile nothing
    ev = json.loads((out / "eval.json").read_text())
    assert [c["step"] for c in ev["curve"]] == [0, 2, 3] and ev["rollout_tokens_per_s"] > 0
    assert ev["before"] == ev["curve"][0]["held_out_reward"]
    assert (out / "reward.png").stat().st_size > 0
    assert "step 3/3" in err and "held-out reward" in err and "rollout" in err.splitlines()[-1]
    assert not (out / "checkpoints").exists() and not (out / "hf").exists()
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_rl_cli_through_the_paged_engine(tiny_rl_model, tmp_path, capsys):
    """`--rollout-engine engine`: the serving engine samples the rollouts and the evaluations;
    greedy evaluations equal the static sampler's (same weights before the first update)."""
    runs = {}
    for eng in ("jax", "engine"):
        assert (
            _rl(
                tiny_rl_model,
                tmp_path / eng,
                "--steps",
                "1",
                "--eval-every",
                "1",
                "--rollout-engine",
                eng,
                "--no-checkpoint",
                "--no-export",
            )
            == 0
        )
        runs[eng] = _records(tmp_path / eng, "eval")
    capsys.readouterr()
    assert runs["engine"][0]["held_out_reward"] == runs["jax"][0]["held_out_reward"]
    assert [r["step"] for r in runs["engine"]] == [0, 1]
    train = _records(tmp_path / "engine", "train")
    assert len(train) == 1 and train[0]["rollout_tokens"] > 0


_COMPARE = (
    "reward_mean",
    "loss",
    "grad_norm",
    "kl",
    "pg_loss",
    "vf_loss",
    "kept",
    "rollout_tokens",
)


@pytest.mark.parametrize("algo", ["grpo", "ppo", "grpo-async"])
def test_rl_cli_resume_equals_uninterrupted(tiny_rl_model, tmp_path, monkeypatch, capsys, algo):
    pytest.importorskip("orbax.checkpoint", reason="checkpoints need orbax")
    from jaxturbo.rl.grpo import GRPOLearner
    from jaxturbo.rl.ppo import PPOLearner

    learner_cls = PPOLearner if algo == "ppo" else GRPOLearner
    full, cut = tmp_path / "full", tmp_path / "cut"
    # PPO trains on every batch (no group filter), so its later steps depend on restored
    # params, value head, optimizer moments and problem sampler
    args = ("--algo", algo.split("-")[0], "--steps", "4", "--save-every", "2", "--eval-every", "2")
    if algo == "grpo-async":  # zero staleness: deterministic, and the thread restarts at step 2
        args += ("--async", "--max-staleness", "0")
    if algo != "ppo":  # operands <= 1: the random model gets some sums right, groups are kept
        args += ("--max-operand", "1", "--eval-problems", "1")  # 3 distinct sums: 1 held out
    assert _rl(tiny_rl_model, full, *args) == 0

    real_update = learner_cls.update

    def crash_at_2(self, state, rollouts):
        if self.steps == 2:
            raise KeyboardInterrupt  # the run dies after step 2's checkpoint
        return real_update(self, state, rollouts)

    monkeypatch.setattr(learner_cls, "update", crash_at_2)
    assert _rl(tiny_rl_model, cut, *args) != 0  # the CLI reports the interrupt
    monkeypatch.setattr(learner_cls, "update", real_update)
    assert _rl(tiny_rl_model, cut, *args, "--resume") == 0

    a, b = _records(full, "train"), _records(cut, "train")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert any("loss" in r for r in a[:2])  # params moved before the interruption
    for ra, rb in zip(a, b):
        assert {k: ra.get(k) for k in _COMPARE} == {k: rb.get(k) for k in _COMPARE}
    assert _records(full, "eval") == _records(cut, "eval")
    assert json.loads((cut / "eval.json").read_text())["resumed_from"] == 2

    if algo != "grpo":
        return
    capsys.readouterr()
    # a checkpoint of another algorithm: one line naming what differs
    code = _rl(tiny_rl_model, cut, *args, "--resume", "--algo", "ppo")
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert "algo: checkpoint 'grpo', now 'ppo'" in err, err


def test_rl_cli_progress_bar_on_a_terminal(tiny_rl_model, tmp_path, monkeypatch):
    import io

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    assert _rl(tiny_rl_model, tmp_path / "run", "--steps", "2", "--eval-problems", "0") == 0
    text = term.getvalue()
    assert "rl grpo" in text and "reward=" in text and "tok_s=" in text, text
    assert "step 1/2" not in text  # the bar replaces the per-step lines


def test_rl_cli_final_checkpoint_and_hf_export(tiny_rl_model, tmp_path, capsys):
    # by default: one checkpoint, at the end, and the final policy as an HF directory; ppo's
    # checkpoint holds policy and value head, the export the policy alone.  The batch shapes
    # and step count (the learning-rate schedule) of test_rl_cli_resume_equals_uninterrupted[ppo]:
    # its compiled ppo programs serve here.
    out = tmp_path / "ppo"
    assert _rl(tiny_rl_model, out, "--algo", "ppo", "--steps", "4", "--eval-problems", "0") == 0
    capsys.readouterr()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["4"]
    ours = checkpoint_logits(out, TOKENS, policy=True)
    assert not np.allclose(hf_logits(tiny_rl_model, TOKENS), ours, atol=1e-4)  # it trained
    np.testing.assert_allclose(hf_logits(out / "hf", TOKENS), ours, atol=1e-4, rtol=0)
    # export-hf of one step's directory, tokenizer from the base model, cast to bfloat16
    exp = tmp_path / "exp"
    assert (
        main(
            [
                "export-hf",
                "--checkpoint",
                str(out / "checkpoints" / "4"),
                "--model",
                str(tiny_rl_model),
                "--dtype",
                "bfloat16",
                "--out",
                str(exp),
            ]
        )
        == 0
    )
    assert "step 4" in capsys.readouterr().out
    from safetensors import safe_open

    with safe_open(next(exp.glob("*.safetensors")), "pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"torch.bfloat16"}
    np.testing.assert_allclose(hf_logits(exp, TOKENS), ours, atol=0.05, rtol=0)
    assert (exp / "tokenizer.json").is_file()
