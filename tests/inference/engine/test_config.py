"""EngineConfig validation and bucket selection."""

import subprocess
import sys

import pytest

from jaxturbo.errors import UserError
from jaxturbo.inference.engine.config import EngineConfig, pick_bucket, power_of_two_buckets


def test_default_buckets_cover_the_budgets():
    cfg = EngineConfig(max_num_seqs=64, max_num_batched_tokens=2048)
    assert cfg.token_buckets == (16, 32, 64, 128, 256, 512, 1024, 2048)
    assert cfg.seq_buckets == (1, 2, 4, 8, 16, 32, 64)
    odd = EngineConfig(max_num_seqs=48, max_num_batched_tokens=3000)
    assert odd.token_buckets[-2:] == (2048, 3000) and odd.seq_buckets[-2:] == (32, 48)
    assert power_of_two_buckets(1, 1) == (1,)


def test_pick_bucket_is_smallest_at_least_n():
    cfg = EngineConfig(max_num_seqs=8, max_num_batched_tokens=100, token_buckets=(8, 40, 100))
    assert [cfg.token_bucket(n) for n in (1, 8, 9, 40, 41, 100)] == [8, 8, 40, 40, 100, 100]
    assert [cfg.seq_bucket(n) for n in (1, 3, 5, 8)] == [1, 4, 8, 8]
    with pytest.raises(ValueError, match="101 exceeds the largest bucket 100"):
        pick_bucket(cfg.token_buckets, 101)


def test_derived_sizes():
    cfg = EngineConfig(
        page_size=32,
        max_model_len=1000,
        max_num_batched_tokens=512,
        long_prefill_token_threshold=100,
    )
    assert cfg.max_pages_per_seq == 32  # ceil(1000 / 32)
    assert cfg.max_chunk_tokens == 100
    assert EngineConfig(max_num_batched_tokens=512).max_chunk_tokens == 512


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(page_size=8), "page_size=8"),
        (dict(page_size=48), "page_size=48"),
        (dict(page_size=256), r"page_size=256 must be a power of two in \[16, 128\]"),
        (dict(num_pages=1), "num_pages=1"),
        (dict(kv_memory_fraction=0.0), "kv_memory_fraction=0.0"),
        (dict(kv_memory_fraction=1.5), "kv_memory_fraction=1.5"),
        (dict(max_num_seqs=0), "max_num_seqs=0"),
        (
            dict(max_num_seqs=64, max_num_batched_tokens=32),
            "max_num_batched_tokens=32 must be an integer >= max_num_seqs=64",
        ),
        (dict(max_model_len=1), "max_model_len=1"),
        (dict(long_prefill_token_threshold=0), "long_prefill_token_threshold=0"),
        (dict(sliding_window=0), "sliding_window=0"),
        (dict(decode_steps=0), r"decode_steps=0 must be an integer >= 1"),
        (dict(decode_steps=2.0), "decode_steps=2.0"),
        (dict(token_buckets=(64, 32, 2048)), "strictly increasing"),
        (
            dict(token_buckets=(16, 1024)),
            "largest bucket 1024 must be >= max_num_batched_tokens=2048",
        ),
        (dict(seq_buckets=()), "non-empty"),
        (dict(seq_buckets=(1, 2, 32)), "largest bucket 32 must be >= max_num_seqs=64"),
    ],
)
def test_bad_values_name_the_value_and_the_valid_range(kw, msg):
    with pytest.raises(UserError, match=msg):
        EngineConfig(**kw)


def test_host_side_modules_do_not_import_jax():
    code = (
        "import sys; import jaxturbo.inference.engine.scheduler; "
        "print(sorted(m for m in sys.modules if m == 'jax' or m.startswith('jax.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
