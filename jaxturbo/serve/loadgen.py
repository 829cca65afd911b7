"""A load generator for OpenAI-compatible servers: Poisson arrivals of streaming requests.

    jaxturbo bench serve --url http://127.0.0.1:8000 --w1 --rate 4 --requests 256
    jaxturbo bench serve --url URL --prompts prompts.jsonl --rate inf --concurrency 32 --out DIR

Workloads:
  --w1           prompt lengths uniform in [256, 1024] tokens (numpy RandomState(0): the lengths,
                 then each prompt's token ids, drawn below --vocab-size), 256 new tokens, greedy;
                 prompts are sent as token ids to /v1/completions with the extension field
                 `"ignore_eos": true` so that every request generates all its tokens (a server
                 that ignores the field may stop earlier: the report counts the tokens it got).
  --prompts FILE JSONL lines {"prompt": text or token ids} or plain text lines (used in order,
                 cycled to --requests).

Arrivals: exponential gaps of mean 1 / --rate seconds (numpy seed --seed); --rate inf sends all
at once; --concurrency caps the requests in flight.  Every request streams
(`stream_options.include_usage` for the token count; `return_token_ids`, an extension, so that a
server without a tokenizer still marks each token).  Measured per request on the client:
time to first token (TTFT: send -> first chunk with text or token ids), inter-token latency
(ITL: the gap between chunks, split evenly over the tokens of a chunk holding several) and
end-to-end latency (E2E: send -> [DONE]).  The report (a Markdown table and JSON): requests/s
and output tokens/s over the run (first send -> last answer), and p50 / p90 / p99 of each
latency.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

W1_PROMPT_LENGTHS = (256, 1024)
W1_NEW_TOKENS = 256
DEFAULT_VOCAB = 1000  # W1 token ids are drawn below this: any real vocabulary is larger
PERCENTILES = (50, 90, 99)


@dataclasses.dataclass(frozen=True)
class LoadRequest:
    """One request of a workload: a text or token-id prompt and its new-token budget."""

    prompt: str | list[int]
    max_tokens: int


@dataclasses.dataclass
class RequestResult:
    """What the client saw of one request (perf_counter seconds)."""

    start: float
    end: float = 0.0
    first: float | None = None
    itl: list[float] = dataclasses.field(default_factory=list)
    output_tokens: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


# ----------------------------------------------------------------------------- workloads
def w1_requests(
    num: int, vocab_size: int = DEFAULT_VOCAB, max_tokens: int = W1_NEW_TOKENS, seed: int = 0
) -> list[LoadRequest]:
    """W1: prompt lengths uniform in [256, 1024] (RandomState(seed): the lengths first, then
    each prompt's token ids in [0, vocab_size))."""
    rng = np.random.RandomState(seed)
    lo, hi = W1_PROMPT_LENGTHS
    lengths = rng.randint(lo, hi + 1, size=num)
    return [
        LoadRequest([int(t) for t in rng.randint(0, vocab_size, n)], max_tokens) for n in lengths
    ]


def file_requests(path: str | Path, num: int, max_tokens: int) -> list[LoadRequest]:
    """Prompts of a file: JSONL {"prompt": ...} lines or text lines, cycled to `num`."""
    from jaxturbo.errors import UserError

    f = Path(path)
    if not f.is_file():
        raise UserError(f"--prompts {path}: no such file")
    prompts: list[str | list[int]] = []
    for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                p = json.loads(line)["prompt"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(
                    f'--prompts {path}:{i}: a JSON line needs a "prompt" field'
                ) from None
            prompts.append(p)
        else:
            prompts.append(line)
    if not prompts:
        raise UserError(f"--prompts {path}: no prompts (empty file)")
    return [LoadRequest(prompts[i % len(prompts)], max_tokens) for i in range(num)]


def arrival_offsets(num: int, rate: float, seed: int = 0) -> np.ndarray:
    """Send times in seconds from the start: a Poisson process of `rate` requests/s (inf: all
    at 0)."""
    if math.isinf(rate):
        return np.zeros(num)
    gaps = np.random.RandomState(seed).exponential(1.0 / rate, size=num)
    return np.concatenate([[0.0], np.cumsum(gaps)[:-1]])


# ----------------------------------------------------------------------------- the client
def request_body(
    req: LoadRequest, *, model: str | None, endpoint: str, ignore_eos: bool
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "max_tokens": req.max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "return_token_ids": True,
    }
    if model is not None:
        body["model"] = model
    if ignore_eos:
        body["ignore_eos"] = True
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        body["prompt"] = req.prompt
    return body


def _chunk_tokens(choice: dict[str, Any]) -> tuple[int, bool]:
    """(tokens in this chunk's choice, whether it carries output at all)."""
    ids = choice.get("token_ids")
    text = choice.get("text")
    if text is None:
        text = (choice.get("delta") or {}).get("content")
    if ids:
        return len(ids), True
    return (1, True) if text else (0, False)


async def _one(
    client: Any,
    url: str,
    body: dict[str, Any],
    headers: dict[str, str],
    start_at: float,
    sem: asyncio.Semaphore | None,
) -> RequestResult:
    await asyncio.sleep(max(0.0, start_at - time.perf_counter()))
    if sem is not None:
        await sem.acquire()
    res = RequestResult(start=time.perf_counter())
    last = None
    counted = 0
    try:
        async with client.stream("POST", url, json=body, headers=headers) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread()).decode()[:300]}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    res.error = f"stream error: {event['error'].get('message')}"
                    break
                now = time.perf_counter()
                for choice in event.get("choices") or ():
                    k, has = _chunk_tokens(choice)
                    if not has:
                        continue
                    if res.first is None:
                        res.first = now
                    elif last is not None and k:
                        res.itl.extend([(now - last) / k] * k)
                    last = now
                    counted += k
                if event.get("usage"):
                    res.output_tokens = int(event["usage"].get("completion_tokens", 0))
    except Exception as e:  # noqa: BLE001 - a failed request is a result
        res.error = f"{type(e).__name__}: {e}"
    finally:
        res.end = time.perf_counter()
        if sem is not None:
            sem.release()
    if not res.output_tokens:
        res.output_tokens = counted
    if res.error is None and res.first is None:
        res.error = "no output"
    return res


async def run_load(
    url: str,
    requests: list[LoadRequest],
    *,
    rate: float = math.inf,
    concurrency: int | None = None,
    model: str | None = None,
    api_key: str | None = None,
    endpoint: str = "completions",
    ignore_eos: bool = False,
    timeout: float = 600.0,
    seed: int = 0,
) -> LoadReport:
    """Send `requests` to the server at `url` (base URL, no /v1) with Poisson arrivals of
    `rate` per second and at most `concurrency` in flight; returns the report."""
    import httpx

    from jaxturbo.errors import UserError

    if endpoint == "chat" and not all(isinstance(q.prompt, str) for q in requests):
        raise UserError(
            "--endpoint chat needs text prompts; token-id prompts (e.g. --w1) go to "
            "--endpoint completions"
        )
    base = url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limit = concurrency or len(requests)
    async with httpx.AsyncClient(
        timeout=httpx.Timeout(timeout, connect=30.0),
        limits=httpx.Limits(max_connections=limit, max_keepalive_connections=limit),
    ) as client:
        if model is None:  # the server's own model
            r = await client.get(f"{base}/v1/models", headers=headers)
            r.raise_for_status()
            model = r.json()["data"][0]["id"]
        path = f"{base}/v1/{'chat/completions' if endpoint == 'chat' else 'completions'}"
        sem = asyncio.Semaphore(concurrency) if concurrency else None
        offsets = arrival_offsets(len(requests), rate, seed)
        t0 = time.perf_counter()
        tasks = [
            _one(
                client,
                path,
                request_body(q, model=model, endpoint=endpoint, ignore_eos=ignore_eos),
                headers,
                t0 + o,
                sem,
            )
            for q, o in zip(requests, offsets)
        ]
        results = await asyncio.gather(*tasks)
    return LoadReport.of(results, rate=rate, concurrency=concurrency, url=url, model=model)


# ----------------------------------------------------------------------------- the report
def percentiles(values: list[float], scale: float = 1.0) -> dict[str, float | None]:
    if not values:
        return {f"p{p}": None for p in PERCENTILES} | {"mean": None}
    a = np.asarray(values) * scale
    return {f"p{p}": float(np.percentile(a, p)) for p in PERCENTILES} | {"mean": float(a.mean())}


@dataclasses.dataclass
class LoadReport:
    """Throughput and latency percentiles of a run (latencies in ms, E2E in s)."""

    url: str
    model: str | None
    rate: float
    concurrency: int | None
    requests: int
    completed: int
    failed: int
    duration_s: float
    requests_per_s: float
    output_tokens: int
    output_tokens_per_s: float
    ttft_ms: dict[str, float | None]
    itl_ms: dict[str, float | None]
    e2e_s: dict[str, float | None]
    errors: list[str]

    @classmethod
    def of(
        cls,
        results: list[RequestResult],
        *,
        rate: float,
        concurrency: int | None,
        url: str,
        model: str | None,
    ) -> LoadReport:
        ok = [r for r in results if r.ok]
        start = min((r.start for r in results), default=0.0)
        end = max((r.end for r in results), default=0.0)
        dur = max(end - start, 1e-9)
        tokens = sum(r.output_tokens for r in ok)
        return cls(
            url=url,
            model=model,
            rate=rate,
            concurrency=concurrency,
            requests=len(results),
            completed=len(ok),
            failed=len(results) - len(ok),
            duration_s=dur,
            requests_per_s=len(ok) / dur,
            output_tokens=tokens,
            output_tokens_per_s=tokens / dur,
            ttft_ms=percentiles([r.first - r.start for r in ok], 1e3),
            itl_ms=percentiles([g for r in ok for g in r.itl], 1e3),
            e2e_s=percentiles([r.end - r.start for r in ok]),
            errors=sorted({r.error for r in results if r.error})[:10],
        )

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["rate"] = "inf" if math.isinf(self.rate) else self.rate
        return d

    def table(self) -> str:
        """Markdown: a summary line and one row per latency."""
        f = lambda v: "-" if v is None else f"{v:.4g}"  # noqa: E731
        rate = "inf" if math.isinf(self.rate) else f"{self.rate:g}"
        lines = [
            f"{self.completed}/{self.requests} requests completed ({self.failed} failed) in "
            f"{self.duration_s:.2f} s at rate {rate}/s"
            + (f", concurrency {self.concurrency}" if self.concurrency else "")
            + f": {self.requests_per_s:.3g} requests/s, {self.output_tokens_per_s:.4g} "
            f"output tokens/s ({self.output_tokens} tokens)",
            "",
            "| latency | p50 | p90 | p99 | mean |",
            "| --- | --- | --- | --- | --- |",
        ]
        for name, d in (
            ("time to first token (ms)", self.ttft_ms),
            ("inter-token latency (ms)", self.itl_ms),
            ("end-to-end (s)", self.e2e_s),
        ):
            lines.append(
                f"| {name} | {f(d['p50'])} | {f(d['p90'])} | {f(d['p99'])} | {f(d['mean'])} |"
            )
        if self.errors:
            lines += ["", "errors: " + "; ".join(self.errors)]
        return "\n".join(lines) + "\n"

    def write(self, out: str | Path) -> None:
        """out/result.json and out/result.md."""
        d = Path(out)
        d.mkdir(parents=True, exist_ok=True)
        (d / "result.json").write_text(json.dumps(self.as_dict(), indent=2))
        (d / "result.md").write_text(self.table())


# ----------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jaxturbo bench serve",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Poisson-arrival streaming load on an OpenAI-"
        "compatible server: throughput and TTFT / ITL / E2E "
        "percentiles (see jaxturbo/serve/loadgen.py)",
    )
    p.add_argument("--url", required=True, help="the server's base URL, e.g. http://127.0.0.1:8000")
    p.add_argument(
        "--rate",
        type=float,
        default=math.inf,
        help="mean requests per second (Poisson arrivals; inf: all at once)",
    )
    p.add_argument("--requests", type=int, default=100, help="requests to send")
    p.add_argument(
        "--concurrency", type=int, default=None, help="most requests in flight (default: no limit)"
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--w1",
        action="store_true",
        help="the W1 workload: prompts of 256..1024 random token ids, 256 new tokens, EOS ignored",
    )
    src.add_argument("--prompts", metavar="FILE", help='JSONL {"prompt": ...} or text lines')
    p.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help=f"new tokens per request (default: {W1_NEW_TOKENS} with --w1, 128 with --prompts)",
    )
    p.add_argument(
        "--endpoint",
        choices=("completions", "chat"),
        default="completions",
        help="/v1/completions or /v1/chat/completions (text prompts only)",
    )
    p.add_argument(
        "--model",
        default=None,
        help="model name to send (default: the server's first in /v1/models)",
    )
    p.add_argument("--api-key", default=None, help="bearer token, if the server needs one")
    p.add_argument(
        "--ignore-eos", action="store_true", help="send ignore_eos (always on with --w1)"
    )
    p.add_argument(
        "--vocab-size",
        type=int,
        default=DEFAULT_VOCAB,
        help="--w1 token ids are drawn in [0, this)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the arrival times")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--out", default=None, help="folder for result.json and result.md")
    return p


def main(argv: list[str] | None = None) -> int:
    from jaxturbo.errors import UserError

    args = build_parser().parse_args(argv)
    if args.requests < 1:
        raise UserError(f"--requests {args.requests} must be >= 1")
    if not args.rate > 0:
        raise UserError(f"--rate {args.rate} must be > 0 (inf: all at once)")
    if args.concurrency is not None and args.concurrency < 1:
        raise UserError(f"--concurrency {args.concurrency} must be >= 1")
    if args.w1:
        reqs = w1_requests(args.requests, args.vocab_size, args.max_tokens or W1_NEW_TOKENS)
    else:
        reqs = file_requests(args.prompts, args.requests, args.max_tokens or 128)
    report = asyncio.run(
        run_load(
            args.url,
            reqs,
            rate=args.rate,
            concurrency=args.concurrency,
            model=args.model,
            api_key=args.api_key,
            endpoint=args.endpoint,
            ignore_eos=args.w1 or args.ignore_eos,
            timeout=args.timeout,
            seed=args.seed,
        )
    )
    print(report.table(), end="")
    if args.out:
        report.write(args.out)
        print(f"wrote {Path(args.out) / 'result.json'} and result.md")
    return 0 if report.completed else 1


if __name__ == "__main__":
    sys.exit(main())
