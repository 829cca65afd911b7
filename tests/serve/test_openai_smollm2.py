"""The official `openai` client against a live server on the loopback interface, serving the real
SmolLM2-135M-Instruct: chat and completions, streaming and not, n, stops, logprobs.  Greedy
answers equal the static `generate`'s (what `jaxturbo generate` runs, with the same chat
encoding) token for token.

The requests of a test run concurrently (the engine batches them), so the module's few dozen
SmolLM2 decode steps on a CPU stay within seconds."""

from __future__ import annotations

import asyncio

import numpy as np
import openai
import pytest

from jaxturbo.bridge import load_model
from jaxturbo.data.chat import encode_chat, stop_ids_for
from jaxturbo.inference import generate
from jaxturbo.inference.engine.config import EngineConfig
from jaxturbo.serve.server import ServeConfig, Server
from tests.serve.helpers import running

CHAT = "What is the capital of France?"
PLAIN = "The three primary colors are"
NEW = 20
MODEL = "smollm2"


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    """(tokenizer, static references, server URL): SmolLM2 in float32 behind a live server."""
    cfg, params, tok = load_model(smollm2_dir, progress=False)
    chat_ids = encode_chat(tok, [{"role": "user", "content": CHAT}])
    plain_ids = list(tok.encode(PLAIN))
    stops = stop_ids_for(cfg, tok)
    # the engine's completions stop at the model's EOS ids; for SmolLM2 these are the chat stops
    assert sorted({*cfg.eos_token_id, tok.eos_token_id}) == stops
    ref = generate(params, cfg, [chat_ids, plain_ids], max_new_tokens=NEW, stop_ids=stops)
    refs = {
        "chat": (chat_ids, ref.sequences()[0], ref.logprobs[0]),
        "plain": (plain_ids, ref.sequences()[1], ref.logprobs[1]),
    }
    # one step shape (x2: with and without the top-k/top-p sampler): compiling SmolLM2 is most
    # of the set-up; 8 sequences run the concurrent requests of a test in one wave
    config = EngineConfig(
        page_size=16,
        num_pages=160,
        max_num_seqs=8,
        max_num_batched_tokens=16,
        max_model_len=512,
        token_buckets=(16,),
        seq_buckets=(8,),
    )
    server = Server.from_model(
        params,
        cfg,
        tok,
        config,
        ServeConfig(MODEL, port=0),
        max_logprobs=5,
        sort_variants=True,
        compilation_cache_dir=None,
    )
    with running(server) as url:
        assert url.startswith("http://127.0.0.1:")
        yield tok, refs, url


def clients(url: str) -> tuple[openai.OpenAI, openai.AsyncOpenAI]:
    kw = dict(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
    return openai.OpenAI(**kw), openai.AsyncOpenAI(**kw)


def gather(*coros):
    """Run the requests concurrently on one event loop; a streamed answer is read there too
    (an async client's connections belong to the loop that opened them)."""

    async def one(coro):
        r = await coro
        return await collect_stream(r) if isinstance(r, openai.AsyncStream) else r

    async def run():
        return await asyncio.gather(*map(one, coros))

    return asyncio.run(run())


async def collect_stream(stream) -> dict:
    """Per choice index: the concatenated text, the chunk count, token ids, finish reason, role
    deltas and logprob tokens; and the usage of the final chunk."""
    out: dict = {"usage": None, "choices": {}}
    async for chunk in stream:
        if chunk.usage is not None:
            out["usage"] = chunk.usage
        for c in chunk.choices:
            d = out["choices"].setdefault(
                c.index,
                {
                    "text": "",
                    "chunks": 0,
                    "ids": [],
                    "finish": None,
                    "roles": [],
                    "logprob_tokens": [],
                },
            )
            piece = c.delta.content if hasattr(c, "delta") else c.text
            d["text"] += piece or ""
            d["chunks"] += 1
            d["ids"] += (c.model_extra or {}).get("token_ids") or []
            if hasattr(c, "delta") and c.delta.role:
                d["roles"].append(c.delta.role)
            if c.finish_reason:
                d["finish"] = c.finish_reason
            if getattr(c.logprobs, "tokens", None):
                d["logprob_tokens"] += c.logprobs.tokens
    return out


def expected_finish(ids: list[int], stop_id: int = 2) -> str:
    return "stop" if ids[-1] == stop_id else "length"


def test_greedy_chat_and_completions_equal_static_generate(smol):
    tok, refs, url = smol
    _, aio = clients(url)
    chat_ids, chat_ref, _ = refs["chat"]
    plain_ids, plain_ref, _ = refs["plain"]
    common = dict(model=MODEL, max_tokens=NEW, temperature=0, extra_body={"return_token_ids": True})
    msgs = [{"role": "user", "content": CHAT}]
    chat, chat_stream, comp, comp_ids, comp_stream = gather(
        aio.chat.completions.create(messages=msgs, **common),
        aio.chat.completions.create(
            messages=msgs, stream=True, stream_options={"include_usage": True}, **common
        ),
        aio.completions.create(prompt=PLAIN, **common),
        aio.completions.create(prompt=plain_ids, **common),
        aio.completions.create(
            prompt=PLAIN, stream=True, stream_options={"include_usage": True}, **common
        ),
    )
    # chat, not streamed: the same tokens, text, finish reason and usage as the static path
    c = chat.choices[0]
    assert c.model_extra["token_ids"] == chat_ref
    assert c.message.role == "assistant"
    assert c.message.content == tok.decode(chat_ref, skip_special_tokens=True)
    assert "Paris" in c.message.content
    assert c.finish_reason == expected_finish(chat_ref)
    assert chat.usage.prompt_tokens == len(chat_ids)
    assert chat.usage.completion_tokens == len(chat_ref)
    assert chat.usage.total_tokens == len(chat_ids) + len(chat_ref)
    assert chat.model_extra["prompt_token_ids"] == chat_ids
    # completions: text prompt and token-id prompt give the same tokens
    for r in (comp, comp_ids):
        assert r.object == "text_completion"
        assert r.choices[0].model_extra["token_ids"] == plain_ref
        assert r.choices[0].text == tok.decode(plain_ref, skip_special_tokens=True)
        assert r.choices[0].finish_reason == expected_finish(plain_ref)
        assert r.usage.prompt_tokens == len(plain_ids)
        assert r.usage.completion_tokens == len(plain_ref)
    # streams, token by token: the same text in several deltas, the role first, usage last
    cs, ps = chat_stream, comp_stream
    for got, ref, text in (
        (cs, chat_ref, c.message.content),
        (ps, plain_ref, comp.choices[0].text),
    ):
        d = got["choices"][0]
        assert d["ids"] == ref and d["text"] == text
        assert d["chunks"] >= 2, "streamed as one chunk"
        assert d["finish"] == expected_finish(ref)
        assert got["usage"].completion_tokens == len(ref)
    assert cs["choices"][0]["roles"] == ["assistant"]


def test_n_samples_seeds_and_stops(smol):
    tok, refs, url = smol
    _, aio = clients(url)
    plain_ids, plain_ref, _ = refs["plain"]
    text = tok.decode(plain_ref, skip_special_tokens=True)
    # a stop string from the middle of the greedy answer, and a stop token id: its 4th token
    words = text.split()
    stop = " " + words[len(words) // 2]
    cut = text.index(stop)
    stop_id = plain_ref[3]
    sampled = dict(model=MODEL, prompt=PLAIN, max_tokens=8, temperature=0.9, n=3, seed=11)
    a, b, stopped, stopped_stream, by_id, n_stream = gather(
        aio.completions.create(**sampled),
        aio.completions.create(**sampled),
        aio.completions.create(
            model=MODEL, prompt=PLAIN, max_tokens=NEW, temperature=0, stop=[stop]
        ),
        aio.completions.create(
            model=MODEL, prompt=PLAIN, max_tokens=NEW, temperature=0, stop=stop, stream=True
        ),
        aio.completions.create(
            model=MODEL,
            prompt=PLAIN,
            max_tokens=NEW,
            temperature=0,
            extra_body={"stop_token_ids": [stop_id], "return_token_ids": True},
        ),
        aio.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": CHAT}],
            max_tokens=6,
            temperature=1.0,
            top_p=0.9,
            n=2,
            seed=5,
            stream=True,
        ),
    )
    # n samples: indices 0..n-1, reproducible with the seed, not all equal
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1
    assert a.usage.completion_tokens == 3 * 8 and a.usage.prompt_tokens == len(plain_ids)
    # a stop string ends the text before it
    assert stopped.choices[0].text == text[:cut]
    assert stopped.choices[0].finish_reason == "stop"
    st = stopped_stream["choices"][0]
    assert st["text"] == text[:cut] and st["finish"] == "stop"
    # a stop token id ends the sample with that token (at its first occurrence)
    first = plain_ref.index(stop_id)
    assert by_id.choices[0].model_extra["token_ids"] == plain_ref[: first + 1]
    assert by_id.choices[0].finish_reason == "stop"
    # n streamed chat samples with top_p: both indices stream to a finish
    ns = n_stream["choices"]
    assert sorted(ns) == [0, 1] and all(d["finish"] in ("stop", "length") for d in ns.values())


def test_logprobs_chat_and_completions(smol):
    tok, refs, url = smol
    _, aio = clients(url)
    _, chat_ref, chat_lp = refs["chat"]
    _, plain_ref, plain_lp = refs["plain"]
    chat, comp, comp_stream = gather(
        aio.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": CHAT}],
            max_tokens=NEW,
            temperature=0,
            logprobs=True,
            top_logprobs=3,
        ),
        aio.completions.create(
            model=MODEL, prompt=PLAIN, max_tokens=NEW, temperature=0, logprobs=2
        ),
        aio.completions.create(
            model=MODEL, prompt=PLAIN, max_tokens=NEW, temperature=0, logprobs=2, stream=True
        ),
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == len(chat_ref)
    np.testing.assert_allclose([e.logprob for e in content], chat_lp[: len(chat_ref)], atol=2e-3)
    for e, tid in zip(content, chat_ref):
        tops = [t.logprob for t in e.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert e.top_logprobs[0].token == e.token == tok.decode([tid])  # greedy: the argmax
        assert e.logprob == pytest.approx(tops[0])
        assert bytes(e.bytes) == e.token.encode()
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(plain_ref)
    np.testing.assert_allclose(lp.token_logprobs, plain_lp[: len(plain_ref)], atol=2e-3)
    assert all(
        len(t) <= 2 and max(t.values()) == pytest.approx(v)
        for t, v in zip(lp.top_logprobs, lp.token_logprobs)
    )
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert comp_stream["choices"][0]["logprob_tokens"] == lp.tokens


def test_errors_reach_the_client_as_openai_exceptions(smol):
    """The synchronous client: errors as its exceptions, then a greedy answer as the static one."""
    tok, refs, url = smol
    sync, _ = clients(url)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        sync.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="512 tokens"):
        sync.completions.create(model=MODEL, prompt=PLAIN, max_tokens=600)
    ok = sync.completions.create(model=MODEL, prompt=PLAIN, max_tokens=2, temperature=0)
    assert ok.usage.completion_tokens == 2
    assert ok.choices[0].text == tok.decode(refs["plain"][1][:2], skip_special_tokens=True)
    models = sync.models.list()
    assert [m.id for m in models.data] == [MODEL]
