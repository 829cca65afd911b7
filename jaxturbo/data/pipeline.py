"""Token documents -> packed [B, T] batches with grain; deterministic and checkpointable.

    docs = encode_documents(read_records(path), tokenizer, seq_len)
    batches = PackedBatches(docs, seq_len=T, batch_size=B, seed=0)
    batch = next(batches)          # dict of numpy arrays [B, T]
    state = batches.get_state()    # JSON-able; batches.set_state(state) resumes exactly

Each document is pre-shifted (inputs = ids[:-1], targets = ids[1:], weights = trained[1:]) before
packing, so a row never trains a document's last token to predict the next document's first.
Packing is grain's first-fit (documents are never split across rows; rows are padded), which
also writes `segment_ids` (1, 2, ... per document in a row; 0 for padding) and per-document
`positions` (0, 1, ... from each document's start).  The model attends only within a segment.
Documents longer than T are cut into pieces of T inputs; each piece is its own document
(positions restart, no attention across the cut).

Order: a seeded shuffle of the documents, reshuffled every epoch, endless.  With several
processes each takes every `shard_count`-th document from `shard_index` (its own rows).
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

from jaxturbo.data.records import Record
from jaxturbo.data.tokenize import tokenize_record
from jaxturbo.errors import UserError

Doc = dict[str, np.ndarray]
FEATURES = ("inputs", "targets", "weights")


def split_document(ids: np.ndarray, trained: np.ndarray, seq_len: int) -> list[Doc]:
    """One tokenized document -> shifted pieces of at most `seq_len` inputs (empty if < 2 tokens)."""
    out = []
    for start in range(0, len(ids) - 1, seq_len):
        end = min(start + seq_len, len(ids) - 1)
        w = trained[start + 1 : end + 1].astype(np.float32)
        out.append({"inputs": ids[start:end], "targets": ids[start + 1 : end + 1], "weights": w})
    return out


def encode_documents(records: list[Record], tokenizer: Any, seq_len: int) -> list[Doc]:
    """Tokenize every record and split it into packable pieces; drop pieces with nothing trained."""
    docs = [d for r in records for d in split_document(*tokenize_record(r, tokenizer), seq_len)]
    docs = [d for d in docs if d["weights"].any()]
    if not docs:
        raise UserError(
            "no record has a trained token (each needs >= 2 tokens, and chats an assistant turn)"
        )
    return docs


class PackedBatches:
    """Endless iterator of packed batches: tokens, targets, weights, segment_ids, positions [B, T]."""

    def __init__(
        self,
        docs: list[Doc],
        *,
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        shard_index: int = 0,
        shard_count: int = 1,
        packing_bins: int | None = None,
    ):
        if batch_size < 1 or seq_len < 2:
            raise UserError(f"need batch_size >= 1 and seq_len >= 2 (got {batch_size}, {seq_len})")
        too_long = [len(d["inputs"]) for d in docs if len(d["inputs"]) > seq_len]
        if too_long:
            raise UserError(
                f"a document of {too_long[0]} tokens exceeds seq_len={seq_len}; "
                "split documents with encode_documents(..., seq_len)"
            )
        mine = docs[shard_index::shard_count]
        if not mine:
            raise UserError(
                f"data shard {shard_index} of {shard_count} is empty: fewer documents "
                f"({len(docs)}) than processes"
            )
        self.seq_len, self.batch_size = seq_len, batch_size
        ds = grain.MapDataset.source(mine).shuffle(seed=seed).repeat().to_iter_dataset()
        # more bins than rows fill rows better; bins are emitted together, in batch-size groups
        bins = packing_bins or batch_size
        ds = grain.experimental.FirstFitPackIterDataset(
            ds,
            length_struct={k: seq_len for k in FEATURES},
            num_packing_bins=bins,
            shuffle_bins=False,
        )
        self._it = ds.batch(batch_size, drop_remainder=True).map(_rename).__iter__()

    def __iter__(self) -> PackedBatches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._it)

    def get_state(self) -> dict[str, Any]:
        return self._it.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._it.set_state(state)


def _rename(b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {
        "tokens": b["inputs"].astype(np.int32),
        "targets": b["targets"].astype(np.int32),
        "weights": b["weights"].astype(np.float32),
        "segment_ids": b["inputs_segment_ids"].astype(np.int32),
        "positions": b["inputs_positions"].astype(np.int32),
    }
