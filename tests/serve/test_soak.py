"""A bounded soak: a few hundred mixed requests from concurrent asyncio clients -- completions and
chat, streamed and not, n > 1, some cancelled mid-stream, some invalid.  Every valid request
completes with what it asked for, nothing hangs (each request and the whole run have timeouts),
and afterwards /metrics shows no running or waiting request and every KV page free."""

from __future__ import annotations

import asyncio
import json
import random

import httpx

from tests.serve.helpers import metric, wait_idle

REQUESTS = 240
CLIENTS = 16  # concurrent clients: more than the 8 running slots, so requests queue
REQUEST_TIMEOUT_S = 60
RUN_TIMEOUT_S = 300


def plan(i: int, rng: random.Random) -> dict:
    """Request i of the mix: its kind, body and what it should return."""
    kind = (
        "complete",
        "complete",
        "complete",
        "stream",
        "stream",
        "chat_stream_n",
        "cancel",
        "invalid",
        "chat",
        "complete_ids",
    )[i % 10]
    new = rng.randint(1, 24)
    base = {
        "model": "tiny",
        "max_tokens": new,
        "ignore_eos": True,
        "temperature": rng.choice([0.0, 0.7]),
        "seed": i,
    }
    if kind in ("complete", "stream", "complete_ids"):
        prompt = (
            [rng.randrange(128) for _ in range(rng.randint(1, 80))]
            if kind == "complete_ids"
            else "x" * rng.randint(1, 80)
        )
        body = {**base, "prompt": prompt, "stream": kind == "stream"}
        if kind == "stream":
            body["stream_options"] = {"include_usage": True}
        return {"kind": kind, "path": "/v1/completions", "body": body, "choices": 1, "new": new}
    if kind in ("chat", "chat_stream_n"):
        n = 2 if kind == "chat_stream_n" else 1
        body = {
            **base,
            "messages": [{"role": "user", "content": "hi " * rng.randint(1, 20)}],
            "n": n,
            "stream": kind == "chat_stream_n",
        }
        return {
            "kind": kind,
            "path": "/v1/chat/completions",
            "body": body,
            "choices": n,
            "new": new,
        }
    if kind == "cancel":
        body = {**base, "prompt": "abc", "max_tokens": 1500, "stream": True}
        return {"kind": kind, "path": "/v1/completions", "body": body}
    bad = rng.choice([{"temperature": 7}, {"n": 0}, {"max_tokens": 10**6}, {"prompt": [-1]}])
    return {"kind": kind, "path": "/v1/completions", "body": {**base, "prompt": "a", **bad}}


async def run_one(client: httpx.AsyncClient, p: dict) -> str:
    """Send one planned request and check its answer; returns its kind."""
    kind, body = p["kind"], p["body"]
    if not body.get("stream"):
        r = await client.post(p["path"], json=body)
        if kind == "invalid":
            assert r.status_code == 400 and "error" in r.json(), r.text
            return kind
        assert r.status_code == 200, r.text
        out = r.json()
        assert len(out["choices"]) == p["choices"]
        assert all(c["finish_reason"] == "length" for c in out["choices"])
        assert out["usage"]["completion_tokens"] == p["new"] * p["choices"]
        return kind
    async with client.stream("POST", p["path"], json=body) as r:
        assert r.status_code == 200
        events, finished, usage = 0, set(), None
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                break
            ev = json.loads(line[6:])
            assert "error" not in ev, ev
            events += 1
            if kind == "cancel" and events == 2:
                return kind  # leaving the block closes the connection mid-stream
            for c in ev["choices"]:
                if c["finish_reason"]:
                    assert c["finish_reason"] == "length"
                    finished.add(c["index"])
            usage = ev.get("usage") or usage
        else:
            raise AssertionError("the stream ended without [DONE]")
    assert finished == set(range(p["choices"])), (kind, finished)
    if kind == "stream":
        assert usage["completion_tokens"] == p["new"]
    return kind


def test_soak_mixed_concurrent_requests(tiny_url):
    rng = random.Random(0)
    plans = [plan(i, rng) for i in range(REQUESTS)]
    before = httpx.get(f"{tiny_url}/metrics").text
    queue: asyncio.Queue = asyncio.Queue()
    for p in plans:
        queue.put_nowait(p)
    done: list[str] = []

    async def client_task():
        async with httpx.AsyncClient(
            base_url=tiny_url, timeout=httpx.Timeout(REQUEST_TIMEOUT_S)
        ) as client:
            while not queue.empty():
                done.append(await run_one(client, queue.get_nowait()))

    async def main():
        await asyncio.wait_for(
            asyncio.gather(*(client_task() for _ in range(CLIENTS))), RUN_TIMEOUT_S
        )

    asyncio.run(main())
    assert len(done) == REQUESTS
    text = wait_idle(tiny_url)
    assert metric(text, "jaxturbo_num_requests_running") == 0
    assert metric(text, "jaxturbo_num_requests_waiting") == 0
    assert metric(text, "jaxturbo_requests_in_flight") == 0
    assert metric(text, "jaxturbo_kv_pages_used") == 0
    assert metric(text, "jaxturbo_kv_pages_free") == metric(text, "jaxturbo_kv_pages_total") > 0
    cancelled = sum(p["kind"] == "cancel" for p in plans)
    aborted = float(
        text.split('jaxturbo_request_success_total{finish_reason="abort"} ')[1].split()[0]
    )
    assert aborted >= cancelled // 2  # most cancels land mid-stream (a 1500-token request)
    # the latency histograms and token counters saw every valid sample (cancelled ones add more)
    valid = [p for p in plans if p["kind"] not in ("cancel", "invalid")]
    samples = sum(p["choices"] for p in valid)
    tokens = sum(p["new"] * p["choices"] for p in valid)

    def grew(name: str) -> float:
        return metric(text, name) - metric(before, name)

    assert grew("jaxturbo_e2e_request_latency_seconds_count") == samples
    assert grew("jaxturbo_time_to_first_token_seconds_count") >= samples
    assert grew("jaxturbo_inter_token_latency_seconds_count") >= tokens - samples
    assert grew("jaxturbo_generation_tokens_total") >= tokens
    assert 0 < metric(text, "jaxturbo_prefix_cache_hit_rate") <= 1  # the prompts share prefixes
    # the server still answers normally afterwards
    r = httpx.post(
        f"{tiny_url}/v1/completions",
        json={"model": "tiny", "prompt": "ok", "max_tokens": 3, "ignore_eos": True},
    )
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
