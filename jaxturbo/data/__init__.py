"""Training data: records (JSONL/text) -> tokens with training masks -> packed batches (grain)."""

from jaxturbo.data.pipeline import PackedBatches, encode_documents, split_document
from jaxturbo.data.records import read_records
from jaxturbo.data.tokenize import tokenize_record

__all__ = ["PackedBatches", "encode_documents", "read_records", "split_document", "tokenize_record"]
