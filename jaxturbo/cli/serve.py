"""`jaxturbo serve`: an OpenAI-compatible HTTP server on the inference engine."""

from __future__ import annotations

import argparse
import math
import os
import sys

from jaxturbo.cli.common import add_mesh_argument, add_model_arguments, use_decode_xla_flags
from jaxturbo.errors import UserError

NAME = "serve"
HELP = (
    "serve a model over an OpenAI-compatible HTTP API (/v1/completions, "
    "/v1/chat/completions) with continuous batching"
)
DEFAULT_MAX_MODEL_LEN = 4096  # when the model's own context is longer


def _buckets(text: str | None, flag: str) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise UserError(f"{flag} {text}: give comma-separated integers, e.g. 16,64,256") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, dtype_default=None)
    add_mesh_argument(p)
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)"
    )
    p.add_argument("--port", type=int, default=8000, help="port to listen on (0: a free port)")
    p.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on /v1 routes (default: "
        "$JAXTURBO_API_KEY if set, else no key)",
    )
    p.add_argument(
        "--served-model-name",
        default=None,
        help="the model name clients send (default: --model as given)",
    )
    p.add_argument(
        "--max-num-seqs",
        type=int,
        default=64,
        help="most samples running at once (the step's sequence dimension)",
    )
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=2048,
        help="token budget of one engine step (prompt chunks + one per decode)",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=256,
        help="samples that may wait for a running slot; beyond, requests get 429",
    )
    p.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="most tokens (prompt + generated) of one request (default: the model's "
        f"context, at most {DEFAULT_MAX_MODEL_LEN})",
    )
    p.add_argument(
        "--kv-memory-fraction",
        type=float,
        default=0.9,
        help="fraction of the free device memory (after the weights) for KV pages",
    )
    p.add_argument(
        "--num-pages",
        type=int,
        default=None,
        help="KV pages in the pool, overriding --kv-memory-fraction (default: sized "
        "from the free memory)",
    )
    p.add_argument(
        "--page-size", type=int, default=16, help="tokens per KV page (a power of two in [16, 128])"
    )
    p.add_argument(
        "--no-prefix-caching",
        action="store_true",
        help="do not reuse the KV pages of identical prompt prefixes",
    )
    p.add_argument(
        "--token-buckets",
        default=None,
        help="comma-separated padded token counts a step is compiled for (default: "
        "16, 32, ... up to --max-num-batched-tokens)",
    )
    p.add_argument(
        "--seq-buckets",
        default=None,
        help="comma-separated padded sequence counts (default: 1, 2, 4, ... up to --max-num-seqs)",
    )
    p.add_argument(
        "--decode-steps",
        type=int,
        default=1,
        help="decode steps per device launch when every running request decodes and none "
        "waits (tokens then stream in groups of up to N; more spreads the host's per-step "
        "work over several tokens)",
    )
    p.add_argument(
        "--max-logprobs",
        type=int,
        default=20,
        help="most top_logprobs a request may ask for (every step computes that many; 0: none)",
    )
    p.add_argument(
        "--no-top-k-top-p",
        action="store_true",
        help="compile no top-k / top-p sampler (half the compiled steps; requests "
        "that use them get 400)",
    )
    p.add_argument(
        "--shutdown-grace",
        type=float,
        default=30.0,
        help="seconds requests in flight may take to finish after SIGTERM / Ctrl-C",
    )
    p.add_argument("--seed", type=int, default=0, help="draws the seeds of requests that give none")
    p.add_argument(
        "--log-level",
        default="warning",
        choices=("critical", "error", "warning", "info", "debug"),
        help="log level of the server (debug: also the request fields ignored)",
    )


def run(args: argparse.Namespace) -> int:
    use_decode_xla_flags()
    import logging

    from jaxturbo.bridge import load_model
    from jaxturbo.inference.engine.config import EngineConfig
    from jaxturbo.models.dispatch import check_mesh_supported
    from jaxturbo.serve.server import ServeConfig, Server

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    config = ServeConfig(
        model_name=args.served_model_name or args.model,
        host=args.host,
        port=args.port,
        api_key=args.api_key or os.environ.get("JAXTURBO_API_KEY"),
        max_queue=args.max_queue,
        shutdown_grace=args.shutdown_grace,
        log_level=args.log_level,
    )
    # flags checked before the model loads: a typo costs no loading time
    if args.decode_steps < 1:
        raise UserError(f"--decode-steps {args.decode_steps} must be >= 1 (1: one per launch)")
    if not 0 <= args.max_logprobs <= 20:
        raise UserError(f"--max-logprobs {args.max_logprobs} must be in [0, 20]")
    token_buckets = _buckets(args.token_buckets, "--token-buckets")
    seq_buckets = _buckets(args.seq_buckets, "--seq-buckets")
    cfg, params, tokenizer = load_model(args.model, dtype=args.dtype)
    check_mesh_supported(cfg, args.mesh)
    ctx = cfg.max_position_embeddings
    max_len = args.max_model_len or min(ctx, DEFAULT_MAX_MODEL_LEN)
    if max_len > ctx:
        raise UserError(f"--max-model-len {max_len} exceeds the model's context of {ctx} tokens")
    engine_config = EngineConfig(
        page_size=args.page_size,
        num_pages=args.num_pages,
        kv_memory_fraction=args.kv_memory_fraction,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=max_len,
        enable_prefix_caching=not args.no_prefix_caching,
        token_buckets=token_buckets,
        seq_buckets=seq_buckets,
        decode_steps=args.decode_steps,
    )
    mesh = None
    if args.mesh:
        import jax

        from jaxturbo.parallel.mesh import make_mesh, parse_mesh_spec

        n = math.prod(parse_mesh_spec(args.mesh).values())
        if n > len(jax.devices()):
            raise UserError(f"--mesh {args.mesh} needs {n} devices; {len(jax.devices())} present")
        mesh = make_mesh(args.mesh, jax.devices()[:n])

    def ready(server: Server) -> None:
        pool = server.worker.engine.runner.pool_note if server.worker.engine else ""
        print(
            f"jaxturbo serve: {config.model_name} listening on {server.url} (OpenAI API under "
            f"{server.url}/v1; KV pool {pool})",
            flush=True,
        )

    server = Server.from_model(
        params,
        cfg,
        tokenizer,
        engine_config,
        config,
        mesh=mesh,
        max_logprobs=args.max_logprobs,
        sort_variants=not args.no_top_k_top_p,
        seed=args.seed,
        on_ready=ready,
    )
    print(
        "jaxturbo serve: compiling the engine's steps; /health answers 503 until done",
        file=sys.stderr,
        flush=True,
    )
    code = server.run()
    print(
        "jaxturbo serve: stopped"
        if code == 0
        else f"jaxturbo serve: the engine failed: {server.front.failure}",
        file=sys.stderr,
        flush=True,
    )
    return code
