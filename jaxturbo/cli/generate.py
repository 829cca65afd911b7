"""`jaxturbo generate`: sample a continuation, streaming tokens to the terminal."""

from __future__ import annotations

import argparse
import sys

import numpy as np

from jaxturbo.cli.common import (
    add_mesh_argument,
    add_model_arguments,
    tensor_parallel_setup,
    use_decode_xla_flags,
)
from jaxturbo.data.chat import encode_prompts, has_chat_template, stop_ids_for
from jaxturbo.errors import UserError

NAME = "generate"
HELP = "generate text from a prompt with the on-device decode loop, streamed to the terminal"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    add_mesh_argument(p)
    p.add_argument(
        "--prompt",
        action="append",
        required=True,
        help="prompt text (repeat for a batch; only the first is streamed)",
    )
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per prompt")
    p.add_argument(
        "--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)"
    )
    p.add_argument(
        "--top-k", type=int, default=0, help="sample among the k likeliest tokens (0: off)"
    )
    p.add_argument(
        "--top-p",
        type=float,
        default=1.0,
        help="sample within the top-p probability mass (1.0: off)",
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument(
        "--chat",
        action="store_true",
        help="wrap each prompt as a user turn with the model's chat template",
    )
    p.add_argument("--no-stream", action="store_true", help="print only when done")


class _Streamer:
    """Host side of the decode loop's io_callback: decodes row 0 incrementally."""

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer
        self.ids: list[int] = []
        self.printed = 0

    def __call__(self, tokens: np.ndarray, live: np.ndarray) -> None:
        if not bool(live[0]):
            return
        self.ids.append(int(tokens[0]))
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[self.printed :])
            sys.stdout.flush()
            self.printed = len(text)


def run(args: argparse.Namespace) -> int:
    use_decode_xla_flags()
    from jaxturbo.bridge import load_model
    from jaxturbo.inference import SamplingParams, generate
    from jaxturbo.models.dispatch import check_mesh_supported

    sampling = SamplingParams(args.temperature, args.top_k, args.top_p)
    cfg, params, tokenizer = load_model(args.model, dtype=args.dtype)
    if args.chat and not has_chat_template(tokenizer):
        raise UserError("--chat: this model's tokenizer has no chat template")
    prompts = encode_prompts(tokenizer, args.prompt, args.chat)
    check_mesh_supported(cfg, args.mesh)  # MLA: one device only
    params, mesh = tensor_parallel_setup(args.mesh, cfg, params, len(prompts))  # before any output
    streamer = None if args.no_stream else _Streamer(tokenizer)
    if streamer is not None:
        print(args.prompt[0], end="" if args.chat else "", flush=True)
        if args.chat:
            print()
    kw = dict(
        max_new_tokens=args.max_new_tokens,
        sampling=sampling,
        stop_ids=stop_ids_for(cfg, tokenizer),
        seed=args.seed,
        stream=streamer,
    )
    res = generate(params, cfg, prompts, mesh=mesh, **kw)
    texts = [tokenizer.decode(s, skip_special_tokens=True) for s in res.sequences()]
    if streamer is not None:
        rest = texts[0][streamer.printed :]
        print(rest)
        texts = texts[1:]
        heads = args.prompt[1:]
    else:
        heads = args.prompt
    for head, text in zip(heads, texts):
        print(f"--- {head}\n{text}")
    return 0
