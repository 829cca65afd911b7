"""Advantages, policy/value losses, KL estimators and aggregation against hand-computed numbers.

Every expected value below was worked out by hand (derivation in the comment beside it), not by
running the code under test.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxturbo.rl.advantages import (
    ADVANTAGE_ESTIMATORS,
    AdvantageConfig,
    compute_advantages,
    gae,
    multi_turn_advantages,
)
from jaxturbo.rl.aggregation import aggregate
from jaxturbo.rl.kl import kl_penalty
from jaxturbo.rl.policy_loss import (
    PolicyLossConfig,
    entropy_bonus,
    entropy_from_logits,
    policy_loss,
    truncated_is_weights,
    value_loss,
)

A = np.testing.assert_allclose


def test_registry_names_follow_verl():
    assert {"gae", "grpo", "rloo", "reinforce_plus_plus"} <= set(ADVANTAGE_ESTIMATORS)


def test_gae_hand_computed():
    # gamma .9, lam .8 (gamma*lam = .72):
    # t2: delta = 1 - .7 = .3                    A2 = .3
    # t1: delta = .9*.7 - .6 = .03               A1 = .03 + .72*.3 = .246
    # t0: delta = .9*.6 - .5 = .04               A0 = .04 + .72*.246 = .21712
    r = jnp.array([[0.0, 0.0, 1.0]])
    v = jnp.array([[0.5, 0.6, 0.7]])
    adv, ret = gae(r, v, jnp.ones((1, 3)), gamma=0.9, lam=0.8)
    A(adv, [[0.21712, 0.246, 0.3]], atol=1e-6)
    A(ret, [[0.71712, 0.846, 1.0]], atol=1e-6)
    # an env token (mask 0, value 9) between policy tokens is skipped: same numbers around it
    adv, ret = gae(
        jnp.array([[0.0, 0.0, 0.0, 1.0]]),
        jnp.array([[0.5, 9.0, 0.6, 0.7]]),
        jnp.array([[1, 0, 1, 1]]),
        gamma=0.9,
        lam=0.8,
    )
    A(adv, [[0.21712, 0.0, 0.246, 0.3]], atol=1e-6)
    A(ret, [[0.71712, 0.0, 0.846, 1.0]], atol=1e-6)


def _outcome_batch():
    # 7 responses of 3 tokens, reward on the last policy token.  groups: {0,1,2,3} rewards
    # 1,0,0,1; {4,5} rewards 2,0; {6} reward 5 (alone).  Row 1 ends early (mask 1,1,0).
    mask = jnp.array([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 1]])
    r = np.zeros((7, 3), np.float32)
    r[:, 2] = [1, 0, 0, 1, 2, 0, 5]
    r[1, 2] = 0.0
    return jnp.asarray(r), mask, jnp.array([0, 0, 0, 0, 4, 4, 6])


def test_grpo_with_and_without_std():
    r, mask, g = _outcome_batch()
    adv, ret = compute_advantages(r, mask, AdvantageConfig("grpo"), group_ids=g)
    # group 0: mean .5, unbiased std sqrt((4 * .25) / 3) = .577350 -> +-.5/.57735 = +-.866025
    # group 4: mean 1, std sqrt((1 + 1) / 1) = 1.414214 -> +-.707107; group 6 alone -> 0
    want = np.array([0.866025, -0.866025, -0.866025, 0.866025, 0.707107, -0.707107, 0.0])
    A(adv, want[:, None] * np.asarray(mask), atol=2e-6)
    A(ret, adv)
    adv, _ = compute_advantages(
        r, mask, AdvantageConfig("grpo", norm_adv_by_std_in_grpo=False), group_ids=g
    )
    want = np.array([0.5, -0.5, -0.5, 0.5, 1.0, -1.0, 0.0])
    A(adv, want[:, None] * np.asarray(mask), atol=1e-6)


def test_rloo():
    r, mask, g = _outcome_batch()
    adv, _ = compute_advantages(r, mask, AdvantageConfig("rloo"), group_ids=g)
    # row 0: 1 - (0 + 0 + 1)/3 = 2/3; row 1: 0 - (1 + 0 + 1)/3 = -2/3; row 4: 2 - 0; alone: 0
    want = np.array([2 / 3, -2 / 3, -2 / 3, 2 / 3, 2.0, -2.0, 0.0])
    A(adv, want[:, None] * np.asarray(mask), atol=1e-6)


def test_reinforce_plus_plus():
    r = jnp.array([[0.0, 0.0, 1.0], [0.0, 0.0, -1.0]])
    mask = jnp.ones((2, 3))
    adv, ret = compute_advantages(r, mask, AdvantageConfig("reinforce_plus_plus", gamma=0.5))
    # returns: [.25, .5, 1], [-.25, -.5, -1]; mean 0; unbiased var 2(.0625+.25+1)/5 = .525
    A(ret, [[0.25, 0.5, 1.0], [-0.25, -0.5, -1.0]], atol=1e-6)
    sd = math.sqrt(0.525)
    A(adv, [[0.25 / sd, 0.5 / sd, 1 / sd], [-0.25 / sd, -0.5 / sd, -1 / sd]], atol=1e-5)


def test_multi_turn_trajectory_vs_step():
    # ep0: prompt, turn 1 (2 tokens), tool output, turn 2 (2 tokens); rewards after turns 0, 1
    # ep1: prompt, turn 1 (2 tokens), then the episode ended; reward .5
    turn_ids = jnp.array([[0, 1, 1, 0, 2, 2], [0, 1, 1, 0, 0, 0]])
    step_r = jnp.array([[0.0, 1.0], [0.5, 0.0]])
    step_m = jnp.array([[1, 1], [1, 0]])
    g = jnp.array([0, 0])
    traj = multi_turn_advantages(step_r, step_m, turn_ids, g, level="trajectory")
    # totals 1, .5: mean .75, unbiased std sqrt(2 * .0625) = .353553 -> +-.707107
    a = 0.707107
    A(traj, [[0, a, a, 0, a, a], [0, -a, -a, 0, 0, 0]], atol=1e-5)  # eps 1e-6 in the std
    step = multi_turn_advantages(step_r, step_m, turn_ids, g, level="step", gamma=0.5)
    # returns-to-go: ep0 [0 + .5*1, 1] = [.5, 1]; ep1 [.5]. mean 2/3, centred [-1/6, 1/3, -1/6],
    # unbiased var (1/36 + 4/36 + 1/36)/2 = 1/12 -> std .288675 -> [-.57735, 1.154701, -.57735]
    lo, hi = -0.577350, 1.154701
    A(step, [[0, lo, lo, 0, hi, hi], [0, lo, lo, 0, 0, 0]], atol=1e-5)


def test_kl_estimators():
    logp = jnp.array([[-1.0, -2.0]])
    ref = jnp.array([[-1.5, -1.0]])
    A(kl_penalty(logp, ref, "k1"), [[0.5, -1.0]], atol=1e-6)
    A(kl_penalty(logp, ref, "k2"), [[0.125, 0.5]], atol=1e-6)
    # k3: log r = ref - logp = -.5, 1: e^-.5 - 1 + .5 = .106531; e - 1 - 1 = .718282
    A(kl_penalty(logp, ref, "k3"), [[0.106531, 0.718282]], atol=1e-6)
    A(kl_penalty(logp, ref, "low_var_kl"), kl_penalty(logp, ref, "k3"))
    with pytest.raises(ValueError, match="k1"):
        kl_penalty(logp, ref, "k4")


def test_aggregation_modes():
    loss = jnp.array([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 0.0, 0.0]])
    mask = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0]])
    # sums 6, 11; counts 3, 2
    assert float(aggregate(loss, mask, "token-mean").value()) == pytest.approx(17 / 5)
    assert float(aggregate(loss, mask, "seq-mean-token-sum").value()) == pytest.approx(8.5)
    assert float(aggregate(loss, mask, "seq-mean-token-mean").value()) == pytest.approx(3.75)
    assert float(aggregate(loss, mask, "seq-mean-token-sum-norm").value()) == pytest.approx(2.125)
    w = aggregate(loss, mask, "seq-mean-token-sum-norm", norm_length=2.0)
    assert (float(w.total), float(w.count)) == pytest.approx((8.5, 2.0))
    # packed: one row, segments 1 (tokens 0-2, token 2 untrained) and 2 (tokens 3-4), padding
    packed = jnp.array([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    seg = jnp.array([[1, 1, 1, 2, 2, 0]])
    m = jnp.array([[1, 1, 0, 1, 1, 0]])
    # seq 1: sum 3 over 2, seq 2: sum 9 over 2
    assert float(aggregate(packed, m, "token-mean", segment_ids=seg).value()) == pytest.approx(3.0)
    assert float(
        aggregate(packed, m, "seq-mean-token-mean", segment_ids=seg).value()
    ) == pytest.approx(3.0)
    w = aggregate(packed, m, "seq-mean-token-sum", segment_ids=seg)
    assert (float(w.total), float(w.count)) == pytest.approx((12.0, 2.0))


def _ppo_case():
    # tokens: (A, ratio) = (1, 1.5), (1, .5), (-1, .5), (-1, 5), (-2, 1.1), masked (1, e^30)
    adv = jnp.array([[1.0, 1.0, -1.0, -1.0, -2.0, 1.0]])
    ratio = np.array([1.5, 0.5, 0.5, 5.0, 1.1, 1.0])
    old = jnp.full((1, 6), -2.0)
    logp = old + jnp.asarray(np.log(ratio), jnp.float32)
    logp = logp.at[0, 5].set(28.0)
    mask = jnp.array([[1, 1, 1, 1, 1, 0]])
    return logp, old, adv, mask


def test_ppo_clip_asymmetric_and_dual_clip():
    logp, old, adv, mask = _ppo_case()
    cfg = PolicyLossConfig(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0)
    loss, m = policy_loss(logp, old, adv, mask, cfg)
    # per token: max(-1.5, -1.28) = -1.28; max(-.5, -.8) = -.5; max(.5, .8) = .8;
    # max(5, 1.28) = 5 capped by dual clip at 3; max(2.2, 2.2) = 2.2 -> sum 4.22 over 5
    assert float(loss.value()) == pytest.approx(4.22 / 5, abs=1e-5)
    assert float(m["clipfrac"]) == pytest.approx(0.4)
    assert float(m["dual_clipfrac"]) == pytest.approx(0.2)
    loss, _ = policy_loss(
        logp, old, adv, mask, PolicyLossConfig(clip_ratio_high=0.28, clip_ratio_c=None)
    )
    assert float(loss.value()) == pytest.approx(6.22 / 5, abs=1e-5)
    # gradient: clipped and dual-capped tokens get none; token 1 gets -A * r = -.5; token 4 gets
    # -A * r = 2.2 (ratio 1.1 is inside the clip range)
    g = jax.grad(lambda lp: policy_loss(lp, old, adv, mask, cfg)[0].total)(logp)
    A(g, [[0.0, -0.5, 0.0, 0.0, 2.2, 0.0]], atol=1e-5)


def test_gspo_sequence_ratio_on_packed_rows():
    # segment 1: log-ratios .1, .3 (mean .2, s = e^.2 = 1.221403), A = 1
    # segment 2: log-ratio -.4 (s = e^-.4 = .670320), A = -1; last token is padding
    old = jnp.zeros((1, 4))
    logp = jnp.array([[0.1, 0.3, -0.4, 0.0]])
    adv = jnp.array([[1.0, 1.0, -1.0, 0.0]])
    seg = jnp.array([[1, 1, 2, 0]])
    mask = jnp.array([[1, 1, 1, 0]])
    cfg = PolicyLossConfig(
        "gspo", clip_ratio_low=0.3, clip_ratio_high=0.3, loss_agg_mode="token-mean"
    )
    loss, _ = policy_loss(logp, old, adv, mask, cfg, segment_ids=seg)
    # seg1 unclipped (1.2214 < 1.3): -1.221403 twice; seg2 clipped at .7: max(.670320, .7) = .7
    assert float(loss.total) == pytest.approx(-2 * 1.221403 + 0.7, abs=1e-5)
    g = jax.grad(lambda lp: policy_loss(lp, old, adv, mask, cfg, segment_ids=seg)[0].total)(logp)
    # each seg-1 token's gradient is -A * s (sequence ratio, token's own log-prob); seg 2 clipped
    A(g, [[-1.221403, -1.221403, 0.0, 0.0]], atol=1e-5)


def _gspo_paper_loss(logp, old, adv, mask, low, high):
    """The GSPO paper's objective (eq. 5-7), negated, written per sequence: one row is one
    response, s_i = (pi(y_i) / pi_old(y_i))^(1/|y_i|), A_i its advantage."""
    n = jnp.sum(mask, axis=1)
    s = jnp.exp(jnp.sum((logp - old) * mask, axis=1) / n)
    a = adv[:, 0]
    return -jnp.mean(jnp.minimum(s * a, jnp.clip(s, 1.0 - low, 1.0 + high) * a))


def test_gspo_defaults_are_the_papers_sequence_objective():
    cfg = PolicyLossConfig("gspo")
    assert (cfg.clip_ratio_low, cfg.clip_ratio_high, cfg.clip_ratio_c, cfg.loss_agg_mode) == (
        3e-4,
        4e-4,
        None,
        "seq-mean-token-mean",
    )
    # 8 responses of up to 6 tokens; per-token log-ratios around +-3e-4 put some sequence
    # ratios inside the clip range and some outside, on both sides, for both advantage signs
    rs = np.random.RandomState(0)
    lengths = np.array([6, 3, 5, 1, 4, 6, 2, 5])
    mask = jnp.asarray((np.arange(6)[None] < lengths[:, None]).astype(np.float32))
    old = jnp.asarray(rs.uniform(-3, -1, (8, 6)), jnp.float32)
    logp = old + jnp.asarray(rs.uniform(-8e-4, 8e-4, (8, 6)), jnp.float32)
    adv = jnp.asarray(np.repeat(rs.choice([-1.5, -0.5, 0.7, 1.2], 8)[:, None], 6, 1), jnp.float32)
    s = np.exp(np.asarray(jnp.sum((logp - old) * mask, 1) / mask.sum(1)))
    assert ((s > 1 + 4e-4) | (s < 1 - 3e-4)).any() and ((s < 1 + 4e-4) & (s > 1 - 3e-4)).any()

    ours = lambda lp: policy_loss(lp, old, adv, mask, cfg)[0].value()  # noqa: E731
    paper = lambda lp: _gspo_paper_loss(lp, old, adv, mask, 3e-4, 4e-4)  # noqa: E731
    np.testing.assert_allclose(float(ours(logp)), float(paper(logp)), rtol=1e-6, atol=1e-7)
    g_ours, g_paper = jax.grad(ours)(logp), jax.grad(paper)(logp)
    assert float(jnp.abs(g_paper).max()) > 0.01  # some sequences are unclipped: a gradient
    A(g_ours, g_paper, rtol=1e-5, atol=1e-7)
    # a large negative-advantage ratio is not dual-clipped: the paper's loss keeps growing
    far = logp.at[0, :].add(2.0 * mask[0])
    np.testing.assert_allclose(float(ours(far)), float(paper(far)), rtol=1e-6)


def test_value_clip_counts_no_token_inside_the_range():
    # every v within 0.4 of v_old, range 0.5: nothing is clipped, whatever the rounding of
    # v_old + (v - v_old) (which differs from v for some of these float32 values)
    rs = np.random.RandomState(0)
    old64 = rs.uniform(-2, 2, (4, 64))
    old = jnp.asarray(old64, jnp.float32)
    v = jnp.asarray(old64 + rs.uniform(-0.4, 0.4, (4, 64)), jnp.float32)
    ret = jnp.asarray(rs.uniform(-2, 2, (4, 64)), jnp.float32)
    assert bool(jnp.any(old + (v - old) != v))  # the case the old formula miscounted
    loss, m = value_loss(v, old, ret, jnp.ones((4, 64)), cliprange_value=0.5)
    assert float(m["vf_clipfrac"]) == 0.0
    assert float(loss.value()) == pytest.approx(float(0.5 * jnp.mean((v - ret) ** 2)), rel=1e-6)


def test_entropy_and_value_loss():
    logits = jnp.array([[[0.0, math.log(3.0)], [0.0, 0.0]]])
    # p = (.25, .75): H = .25 ln 4 + .75 ln(4/3) = .562335; uniform over 2: ln 2
    A(entropy_from_logits(logits), [[0.562335, math.log(2)]], atol=1e-6)
    assert float(entropy_bonus(logits, jnp.array([[1, 0]])).value()) == pytest.approx(
        0.562335, abs=1e-6
    )
    v, old, ret = jnp.array([[1.0, 2.0]]), jnp.array([[0.5, 2.0]]), jnp.array([[2.0, 1.0]])
    loss, m = value_loss(v, old, ret, jnp.ones((1, 2)), cliprange_value=0.2)
    # token 0: (1 - 2)^2 = 1 vs clipped v .7: (.7 - 2)^2 = 1.69 -> 1.69; token 1: 1 and 1
    assert float(loss.value()) == pytest.approx(0.5 * (1.69 + 1.0) / 2)
    assert float(m["vf_clipfrac"]) == pytest.approx(0.5)
    loss, _ = value_loss(v, old, ret, jnp.ones((1, 2)), cliprange_value=None)
    assert float(loss.value()) == pytest.approx(0.5)


def test_truncated_importance_weights():
    # pi_old / pi_rollout = e^.5 = 1.648721 (kept), e^2 = 7.39 (capped at 2), e^-1 = .367879
    old = jnp.array([[-1.0, -1.0, -2.0]])
    rollout = jnp.array([[-1.5, -3.0, -1.0]])
    w = truncated_is_weights(old, rollout, cap=2.0)
    A(w, [[1.648721, 2.0, 0.367879]], atol=1e-5)
    # on-policy tokens (ratio 1, inside the clip) with A = 1: loss -1 each, weighted -> -sum(w)
    loss, _ = policy_loss(old, old, jnp.ones((1, 3)), jnp.ones((1, 3)), is_weights=w)
    assert float(loss.total) == pytest.approx(-(1.648721 + 2.0 + 0.367879), abs=1e-5)
