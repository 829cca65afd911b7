"""A word-level tokenizer for random-weight model shapes: token id i <-> the word "w<i>".

A prompt of token ids becomes the text "w12 w7 w993 ...", which encodes back to exactly those ids,
so a text prompt and a token-id prompt are the same workload, and every generated token decodes
to text (the server's incremental detokenization runs as for a real model).  It saves like any
transformers tokenizer (`save_pretrained`), with a chat template, so `jaxturbo serve --model DIR`
loads it from a model directory.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}w0{% endif %}"
)


def word_tokenizer(vocab_size: int) -> Any:
    """A transformers fast tokenizer over the words w0 .. w<vocab_size - 1> (split on spaces;
    unknown words -> w0; no special tokens, no BOS/EOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="w0")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def ids_to_text(ids: Sequence[int]) -> str:
    """The text `word_tokenizer` encodes to exactly `ids`."""
    return " ".join(f"w{int(i)}" for i in ids)
