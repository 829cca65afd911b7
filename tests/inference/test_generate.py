"""Generation on a tiny random model: token-for-token equal to transformers' greedy generate."""

import numpy as np
import torch

from jaxturbo.inference import SamplingParams, generate
from tests.helpers.hf_tiny import random_tokens, tiny_hf_model


def _hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy continuation of one prompt: n new tokens, no stop token."""
    with torch.no_grad():
        return model.generate(
            torch.tensor([prompt]),
            max_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )[0, len(prompt) :].tolist()


def test_greedy_batch_of_different_lengths_matches_transformers():
    model, cfg, params = tiny_hf_model("llama", seed=1)
    full = random_tokens((3, 11), seed=5)
    prompts = [list(full[0, :11]), list(full[1, :4]), list(full[2, :7])]
    res = generate(params, cfg, prompts, max_new_tokens=12, bucket_multiple=8)
    for p, got in zip(prompts, res.sequences()):
        assert got == _hf_greedy(model, p, 12)
    # logprobs are those of the chosen greedy tokens: <= 0 and finite
    assert np.all(res.logprobs <= 0) and np.isfinite(res.logprobs).all()


def test_stop_tokens_end_rows_and_streaming_sees_every_token():
    _, cfg, params = tiny_hf_model("qwen2", seed=2)
    prompts = [[5, 6, 7], [9, 3]]
    free = generate(params, cfg, prompts, max_new_tokens=10, bucket_multiple=8)
    stop = int(free.tokens[0, 3])  # make row 0 stop at its 4th token
    seen = []
    res = generate(
        params,
        cfg,
        prompts,
        max_new_tokens=10,
        stop_ids=[stop],
        bucket_multiple=8,
        stream=lambda t, live: seen.append((t.copy(), live.copy())),
    )
    first = list(free.tokens[0]).index(stop)
    assert res.num_tokens[0] == first + 1
    assert res.sequences()[0] == list(free.tokens[0, : first + 1])
    assert (res.tokens[0, first + 1 :] == 0).all()
    streamed_row0 = [int(t[0]) for t, live in seen if live[0]]
    assert streamed_row0 == res.sequences()[0]


def test_stop_checks_every_few_steps_without_changing_tokens():
    """The loop tests for stops every STOP_CHECK_EVERY steps (a static inner loop: no host
    round trip per step) and runs the max_new_tokens % STOP_CHECK_EVERY tail after it: 37 new
    tokens are 2 chunks of 16 and a tail of 5.  Greedy tokens still equal transformers'; with
    every row stopped early, the loop ends at the first chunk boundary (16 streamed steps, not
    37) and skips the tail."""
    from jaxturbo.inference.generation import STOP_CHECK_EVERY

    assert STOP_CHECK_EVERY == 16
    model, cfg, params = tiny_hf_model("llama", seed=4)
    prompts = [[5, 6, 7], [9, 3]]
    free = generate(params, cfg, prompts, max_new_tokens=37, bucket_multiple=8)
    for p, got in zip(prompts, free.sequences()):
        assert got == _hf_greedy(model, p, 37)
    stops = [int(free.tokens[0, 3]), int(free.tokens[1, 2])]
    steps = []
    res = generate(
        params,
        cfg,
        prompts,
        max_new_tokens=37,
        stop_ids=stops,
        bucket_multiple=8,
        stream=lambda t, live: steps.append(live.copy()),
    )
    for row in range(2):
        first = min(i for i, t in enumerate(free.tokens[row]) if int(t) in stops)
        assert res.num_tokens[row] == first + 1
        assert res.sequences()[row] == list(free.tokens[row, : first + 1])
        assert (res.tokens[row, first + 1 :] == 0).all()
    assert len(steps) == STOP_CHECK_EVERY and not steps[-1].any()


def test_sampling_is_seeded():
    _, cfg, params = tiny_hf_model("qwen3", seed=3)
    sp = SamplingParams(temperature=1.0, top_p=0.9)
    a = generate(params, cfg, [[1, 2, 3]], max_new_tokens=8, sampling=sp, seed=7, bucket_multiple=8)
    b = generate(params, cfg, [[1, 2, 3]], max_new_tokens=8, sampling=sp, seed=7, bucket_multiple=8)
    c = generate(params, cfg, [[1, 2, 3]], max_new_tokens=8, sampling=sp, seed=8, bucket_multiple=8)
    assert a.sequences() == b.sequences()
    assert a.sequences() != c.sequences()


def test_prefill_logits_are_each_rows_last_prompt_token():
    """decode.prefill runs the LM head on each row's last prompt token only: those logits equal
    transformers' last-position logits of each prompt alone (rows right-padded to 11)."""
    import jax.numpy as jnp

    from jaxturbo.inference.generation import prefill
    from jaxturbo.models.transformer import forward, init_cache

    model, cfg, params = tiny_hf_model("qwen2", seed=2)
    full = random_tokens((3, 11), seed=6)
    lengths = np.array([11, 4, 7], np.int32)
    toks = np.where(np.arange(11)[None] < lengths[:, None], full, 0).astype(np.int32)
    cache = init_cache(cfg, 3, 16, jnp.float32)
    logits, cache = prefill(
        forward, params, cfg, jnp.asarray(toks), jnp.asarray(lengths), cache, "xla"
    )
    assert logits.shape == (3, cfg.vocab_size)
    np.testing.assert_array_equal(np.asarray(cache["lengths"]), lengths)
    for row, n in enumerate(lengths):
        with torch.no_grad():
            ref = model(torch.tensor(full[row : row + 1, :n])).logits[0, -1].numpy()
        np.testing.assert_allclose(np.asarray(logits[row]), ref, rtol=1e-4, atol=1e-4)
