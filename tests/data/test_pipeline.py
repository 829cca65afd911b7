"""Data: records, chat masking, grain packing (determinism, resumable state), and the two
acceptance checks: a packed batch's loss is the sum of its documents' losses, and tokens with
zero weight get zero gradient."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxturbo.errors import UserError
from jaxturbo.models.config import ModelConfig
from jaxturbo.models.init import init_params
from jaxturbo.models.transformer import forward
from jaxturbo.train.losses import cross_entropy

pytest.importorskip("grain")  # jaxturbo.data packs with it; the GPU machine's image lacks it
from jaxturbo.data import PackedBatches, encode_documents, read_records, tokenize_record  # noqa: E402


class CharTokenizer:
    """One token per character (ids 3..66), eos = 1, a ChatML-like template."""

    eos_token_id = 1
    chat_template = "chatml"

    def encode(self, text, add_special_tokens=False):
        return [3 + ord(c) % 64 for c in text]

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        s = "".join(f"<{m['role']}>{m['content']}|" for m in messages)
        return s + ("<assistant>" if add_generation_prompt else "")


TOK = CharTokenizer()


def _write(tmp_path, name, lines):
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return p


def test_malformed_lines_name_their_line_number(tmp_path):
    good = json.dumps({"text": "hello"})
    for bad, msg in [
        ("{not json", "not valid JSON"),
        ('{"txt": "x"}', 'needs "text"'),
        ('{"messages": [{"role": "user", "content": "q"}]}', "no assistant turn"),
        ('{"messages": [{"role": "bot", "content": "q"}]}', "role 'bot'"),
        ("[1, 2]", "expected a JSON object"),
    ]:
        p = _write(tmp_path, "d.jsonl", [good, "", bad, good])
        with pytest.raises(UserError, match=rf"d.jsonl:3: .*{msg}"):
            read_records(p)


def test_text_file_paragraphs_and_kinds(tmp_path):
    p = _write(tmp_path, "t.txt", ["para one", "still one", "", "", "para two"])
    assert read_records(p) == [{"text": "para one\nstill one"}, {"text": "para two"}]
    ids, tr = tokenize_record({"prompt": "ab", "completion": "cd"}, TOK)
    assert ids.tolist() == TOK.encode("abcd") + [1]
    assert tr.tolist() == [False, False, True, True, True]


def test_chat_trains_only_assistant_turns():
    msgs = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "ok"},
    ]
    ids, tr = tokenize_record({"messages": msgs}, TOK)
    assert ids.tolist() == TOK.encode(TOK.apply_chat_template(msgs))
    trained = "".join(chr(((i - 3) % 64) + 64) for i in ids[tr])  # map back through the table
    want = "".join(chr(((i - 3) % 64) + 64) for i in TOK.encode("yo|ok|"))
    assert trained == want


def _docs(n=12, seed=0):
    rs = np.random.RandomState(seed)
    recs = [
        {"text": "".join(chr(97 + c) for c in rs.randint(0, 26, rs.randint(3, 14)))}
        for _ in range(n)
    ]
    return encode_documents(recs, TOK, seq_len=16)


def test_packing_rows_segments_positions_and_resume():
    docs = _docs()
    it = PackedBatches(docs, seq_len=16, batch_size=2, seed=3)
    b = next(it)
    assert set(b) == {"tokens", "targets", "weights", "segment_ids", "positions"}
    assert all(v.shape == (2, 16) for v in b.values())
    seg, pos = b["segment_ids"], b["positions"]
    assert seg.max() >= 2  # several documents share a row
    for r in range(2):
        for s in set(seg[r]) - {0}:
            idx = np.flatnonzero(seg[r] == s)
            assert (np.diff(idx) == 1).all() and pos[r, idx].tolist() == list(range(len(idx)))
    assert (b["weights"][seg == 0] == 0).all()
    # targets are the next input within a document
    same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    assert (b["targets"][:, :-1][same] == b["tokens"][:, 1:][same]).all()
    # deterministic, and the saved state resumes the exact stream: restored into an iterator
    # that stands elsewhere (3 batches in), whose own next batches differ from the rest
    state = it.get_state()
    rest = [next(it) for _ in range(4)]
    again = PackedBatches(docs, seq_len=16, batch_size=2, seed=3)
    for _ in range(3):
        next(again)
    assert not all((rest[0][k] == v).all() for k, v in next(again).items())
    again.set_state(json.loads(json.dumps(state)))
    for x in rest:
        y = next(again)
        assert all((x[k] == y[k]).all() for k in x)
    # and a fresh iterator with the same seed replays the stream from its start
    fresh = PackedBatches(docs, seq_len=16, batch_size=2, seed=3)
    assert all((b[k] == v).all() for k, v in next(fresh).items())


CFG = ModelConfig(
    vocab_size=80,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
)


def test_packed_loss_is_sum_of_document_losses_and_masked_tokens_get_no_gradient():
    params = init_params(CFG, jax.random.key(1))
    docs = _docs()
    b = next(PackedBatches(docs, seq_len=16, batch_size=2, seed=0))
    fwd = jax.jit(lambda p, t, pos, seg: forward(p, CFG, t, positions=pos, segment_ids=seg)[0])
    logits = fwd(
        params, jnp.asarray(b["tokens"]), jnp.asarray(b["positions"]), jnp.asarray(b["segment_ids"])
    )
    packed = cross_entropy(logits, jnp.asarray(b["targets"]), jnp.asarray(b["weights"]))
    # every document of the batch alone, one per row, right-padded (causal: padding after a
    # document cannot change its logits), no segment ids
    rows = [(r, s) for r in range(2) for s in sorted(set(b["segment_ids"][r].tolist()) - {0})]
    alone = {k: np.zeros((len(rows), 16), b[k].dtype) for k in ("tokens", "targets", "weights")}
    for i, (r, s) in enumerate(rows):
        idx = b["segment_ids"][r] == s
        for k in alone:
            alone[k][i, : idx.sum()] = b[k][r, idx]
    lg, _ = jax.jit(lambda p, t: forward(p, CFG, t))(params, jnp.asarray(alone["tokens"]))
    one = cross_entropy(lg, jnp.asarray(alone["targets"]), jnp.asarray(alone["weights"]))
    total, count = float(one.total), float(one.count)
    assert float(packed.count) == count
    assert float(packed.total) == pytest.approx(total, rel=1e-5)

    # masked targets: zero gradient on their logits, and changing them changes no gradient
    w = jnp.asarray(b["weights"]).at[0, :5].set(0.0)

    def loss_of_logits(lg, targets):
        return cross_entropy(lg, targets, w).value()

    t = jnp.asarray(b["targets"])
    g = jax.jit(jax.grad(loss_of_logits))(logits, t)
    assert float(jnp.abs(g[0, :5]).max()) == 0.0
    assert float(jnp.abs(g[w > 0]).max()) > 0.0

    def loss_of_params(p, targets):
        lg = fwd(
            p, jnp.asarray(b["tokens"]), jnp.asarray(b["positions"]), jnp.asarray(b["segment_ids"])
        )
        return cross_entropy(lg, targets, w).value()

    grad = jax.jit(jax.grad(loss_of_params))
    g1, g2 = grad(params, t), grad(params, t.at[0, :5].set((t[0, :5] + 7) % 80))
    for x, y in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
