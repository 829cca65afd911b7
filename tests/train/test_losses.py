"""Losses against numbers computed by hand (numpy, written out term by term)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxturbo.train import losses

# two rows, three positions, vocabulary of 3
LOGITS = np.array(
    [
        [[0.0, 1.0, 2.0], [1.0, 1.0, 1.0], [3.0, 0.0, 0.0]],
        [[0.5, 0.0, -0.5], [0.0, 2.0, 0.0], [1.0, 2.0, 3.0]],
    ],
    np.float32,
)
TARGETS = np.array([[2, 0, 1], [0, 1, 2]], np.int32)


def nll(row, t):
    z = LOGITS[row, t]
    return math.log(sum(math.exp(v) for v in z)) - z[TARGETS[row, t]]


def test_token_nll_matches_hand_computed():
    got = np.asarray(losses.token_nll(jnp.asarray(LOGITS), jnp.asarray(TARGETS)))
    # row 0 position 0: log(1 + e + e^2) - 2
    assert got[0, 0] == pytest.approx(math.log(1 + math.e + math.e**2) - 2, rel=1e-6)
    assert got[0, 1] == pytest.approx(math.log(3), rel=1e-6)
    want = np.array([[nll(r, t) for t in range(3)] for r in range(2)])
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_token_normalisation_weights_and_masks():
    w = np.array([[1, 0, 2], [0.5, 1, 0]], np.float32)
    out = losses.cross_entropy(jnp.asarray(LOGITS), jnp.asarray(TARGETS), jnp.asarray(w))
    total = nll(0, 0) + 2 * nll(0, 2) + 0.5 * nll(1, 0) + nll(1, 1)
    assert float(out.total) == pytest.approx(total, rel=1e-6)
    assert float(out.count) == pytest.approx(4.5)
    assert float(out.value()) == pytest.approx(total / 4.5, rel=1e-6)


def test_sequence_normalisation_rows_and_packed_segments():
    w = np.array([[1, 1, 1], [1, 0, 1]], np.float32)
    rows = losses.cross_entropy(
        jnp.asarray(LOGITS), jnp.asarray(TARGETS), jnp.asarray(w), normalize="sequence"
    )
    r0 = (nll(0, 0) + nll(0, 1) + nll(0, 2)) / 3
    r1 = (nll(1, 0) + nll(1, 2)) / 2
    assert float(rows.value()) == pytest.approx((r0 + r1) / 2, rel=1e-6)
    assert float(rows.count) == 2
    # row 0 holds two documents (segments 1, 2); row 1 one document and padding (segment 0)
    seg = np.array([[1, 1, 2], [1, 1, 0]], np.int32)
    w2 = np.array([[1, 1, 1], [1, 1, 0]], np.float32)
    packed = losses.cross_entropy(
        jnp.asarray(LOGITS),
        jnp.asarray(TARGETS),
        jnp.asarray(w2),
        segment_ids=jnp.asarray(seg),
        normalize="sequence",
    )
    docs = [(nll(0, 0) + nll(0, 1)) / 2, nll(0, 2), (nll(1, 0) + nll(1, 1)) / 2]
    assert float(packed.count) == 3
    assert float(packed.value()) == pytest.approx(sum(docs) / 3, rel=1e-6)


def test_forward_and_reverse_kl_with_temperature():
    s = np.array([[[0.0, 1.0]]], np.float32)
    t = np.array([[[1.0, 0.0]]], np.float32)
    temp = 2.0
    ps = np.exp(s[0, 0] / temp) / np.exp(s[0, 0] / temp).sum()
    pt = np.exp(t[0, 0] / temp) / np.exp(t[0, 0] / temp).sum()
    fwd = temp**2 * float(np.sum(pt * np.log(pt / ps)))
    rev = temp**2 * float(np.sum(ps * np.log(ps / pt)))
    w = jnp.ones((1, 1))
    got_f = losses.distill_kl(jnp.asarray(s), jnp.asarray(t), w, temperature=temp)
    got_r = losses.distill_kl(
        jnp.asarray(s), jnp.asarray(t), w, temperature=temp, direction="reverse"
    )
    assert float(got_f.value()) == pytest.approx(fwd, rel=1e-5)
    assert float(got_r.value()) == pytest.approx(rev, rel=1e-5)
    # identical distributions: zero loss, and no gradient flows into the teacher
    same = losses.distill_kl(jnp.asarray(s), jnp.asarray(s), w).value()
    assert float(same) == pytest.approx(0.0, abs=1e-7)
    g = jax.grad(lambda tl: losses.distill_kl(jnp.asarray(s), tl, w).value())(jnp.asarray(t))
    assert float(jnp.abs(g).max()) == 0.0


def test_asymmetric_kl_directions_differ():
    s = np.array([[[0.0, 3.0, 0.0]]], np.float32)
    t = np.array([[[1.0, 0.0, 2.0]]], np.float32)
    w = jnp.ones((1, 1))
    f = losses.distill_kl(jnp.asarray(s), jnp.asarray(t), w).value()
    r = losses.distill_kl(jnp.asarray(s), jnp.asarray(t), w, direction="reverse").value()
    assert abs(float(f) - float(r)) > 1e-3


def test_activation_mse():
    a = np.array([[[1.0, 2.0], [0.0, 0.0]]], np.float32)
    b = np.array([[[0.0, 0.0], [3.0, 4.0]]], np.float32)
    out = losses.activation_mse(jnp.asarray(a), jnp.asarray(b), jnp.asarray([[1.0, 0.0]]))
    assert float(out.value()) == pytest.approx((1 + 4) / 2)
    out2 = losses.activation_mse(jnp.asarray(a), jnp.asarray(b), jnp.asarray([[1.0, 1.0]]))
    assert float(out2.value()) == pytest.approx(((1 + 4) / 2 + (9 + 16) / 2) / 2)


def test_weighted_sums_add_like_one_batch():
    w = np.ones((2, 3), np.float32)
    whole = losses.cross_entropy(jnp.asarray(LOGITS), jnp.asarray(TARGETS), jnp.asarray(w))
    parts = [
        losses.cross_entropy(
            jnp.asarray(LOGITS[i : i + 1]),
            jnp.asarray(TARGETS[i : i + 1]),
            jnp.asarray(w[i : i + 1]),
        )
        for i in range(2)
    ]
    summed = parts[0] + parts[1]
    assert float(summed.value()) == pytest.approx(float(whole.value()), rel=1e-6)


def test_unknown_modes_raise():
    w = jnp.ones((2, 3))
    with pytest.raises(ValueError, match="normalisation"):
        losses.cross_entropy(jnp.asarray(LOGITS), jnp.asarray(TARGETS), w, normalize="batch")
    with pytest.raises(ValueError, match="direction"):
        losses.kl_per_token(jnp.asarray(LOGITS), jnp.asarray(LOGITS), direction="js")
