"""The live tiny server shared by the streaming, soak and load-generator tests of one test
process."""

from __future__ import annotations

import pytest

from tests.serve.helpers import running, tiny_server


@pytest.fixture(scope="session")
def tiny_url():
    """Base URL of a started server over a tiny random model with a byte-level tokenizer (vocab
    256, a chat template), 8 running + 256 queued samples, 2048-token context, the top-k/top-p
    sampler compiled in; one step shape of 16 tokens (x2 with the sampler)."""
    server = tiny_server(
        vocab_size=256,
        sort_variants=True,
        engine=dict(token_buckets=(16,), max_num_batched_tokens=16),
    )
    with running(server) as url:
        yield url
