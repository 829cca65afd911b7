"""Training data: records (JSONL/text) -> tokens with training masks -> packed batches (grain)."""

from pathlib import Path

from jaxturbo.data.pipeline import PackedBatches, encode_documents, split_document
from jaxturbo.data.records import read_records
from jaxturbo.data.tokenize import tokenize_record

# WikiText-2 validation text (CC BY-SA; see wikitext-2/SOURCE), shipped with the package: the
# demo's perplexity text and convert-mla's default calibration data.
WIKITEXT2_VALID = Path(__file__).resolve().parent / "wikitext-2" / "valid.txt"

__all__ = [
    "WIKITEXT2_VALID",
    "PackedBatches",
    "encode_documents",
    "read_records",
    "split_document",
    "tokenize_record",
]
