"""Every error answer of the server, in OpenAI's JSON shape, each followed by a successful request
(a bad request never harms the others): invalid JSON and parameters (400 naming the field and
its valid range), prompt + max_tokens beyond the context (400 naming both numbers), refused
fields, unknown model (404), missing / wrong API key (401), queue full (429); a client that
disconnects mid-stream frees its slot and pages.  A tiny random model serves."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.serve.helpers import running, tiny_server, wait_idle

KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
OK = {"model": "tiny", "prompt": "hello", "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def url():
    # capacity: 2 running + 1 queued samples; context 2048 tokens
    # a 2 ms pause per step: a 1900-token request streams for seconds
    server = tiny_server(
        api_key=KEY, max_queue=1, engine=dict(max_num_seqs=2, seq_buckets=(2,)), step_delay_s=0.002
    )
    with running(server) as u:
        yield u


def post(
    url: str, path: str, body=None, *, content: bytes | None = None, headers: dict | None = None
) -> httpx.Response:
    h = AUTH if headers is None else headers
    if content is not None:
        return httpx.post(f"{url}{path}", content=content, headers=h, timeout=60)
    return httpx.post(f"{url}{path}", json=body, headers=h, timeout=60)


def assert_error(r: httpx.Response, status: int, param: str | None, *needles: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param
    for n in needles:
        assert n in err["message"], (n, err["message"])
    return err


def assert_ok(url: str, path: str = "/v1/completions") -> None:
    body = (
        OK
        if path.endswith("/completions") and "chat" not in path
        else {
            "model": "tiny",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 3,
            "temperature": 0,
        }
    )
    r = post(url, path, body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")


BAD_PARAMS = [
    ({"temperature": 2.5}, "temperature", ["2.5", "[0, 2]"]),
    ({"temperature": "hot"}, "temperature", ["[0, 2]"]),
    ({"top_p": 0}, "top_p", ["(0, 1]"]),
    ({"max_tokens": 0}, "max_tokens", [">= 1"]),
    ({"max_tokens": 1.5}, "max_tokens", ["integer"]),
    ({"n": 0}, "n", ["[1, 128]"]),
    ({"n": 4}, "n", ["4 samples", "at most 3"]),
    ({"logprobs": 9}, "logprobs", ["[0, 5]"]),
    ({"seed": "x"}, "seed", ["integer"]),
    ({"stop": [""]}, "stop", ["non-empty"]),
    ({"stop": 3}, "stop", ["string"]),
    ({"stop_token_ids": [500]}, "stop_token_ids", ["[0, 127]"]),
    ({"stream": "yes"}, "stream", ["true or false"]),
    ({"prompt": []}, "prompt", ["non-empty"]),
    ({"prompt": [[1, 2], [1000]]}, "prompt", ["1000", "[0, 127]"]),
    ({"prompt": None}, "prompt", ["required"]),
    ({"top_k": 5, "temperature": 1.0}, "top_k", ["not enabled"]),
    # fields whose effect this server cannot give are refused, not ignored
    ({"echo": True}, "echo", ["echo"]),
    ({"suffix": "x"}, "suffix", ["suffix"]),
    ({"best_of": 3}, "best_of", ["best_of=3"]),
    ({"logit_bias": {"5": 10}}, "logit_bias", ["logit_bias"]),
    ({"presence_penalty": 0.5}, "presence_penalty", ["presence_penalty"]),
    ({"frequency_penalty": 1}, "frequency_penalty", ["frequency_penalty"]),
]


@pytest.mark.parametrize("change,param,needles", BAD_PARAMS, ids=[p for _, p, _ in BAD_PARAMS])
def test_bad_completion_parameters_are_400_naming_the_field(url, change, param, needles):
    body = {k: v for k, v in {**OK, **change}.items() if v is not None}  # None: left out
    assert_error(post(url, "/v1/completions", body), 400, param, *needles)
    assert_ok(url)


BAD_CHAT = [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", ["tools"]),
    ({"tool_choice": "auto"}, "tool_choice", ["tool_choice"]),
    ({"response_format": {"type": "json_object"}}, "response_format", ["json_object"]),
    ({"top_logprobs": 2}, "top_logprobs", ["logprobs=true"]),
    ({"logprobs": True, "top_logprobs": 6}, "top_logprobs", ["[0, 5]"]),
    ({"messages": []}, "messages", ["non-empty"]),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages", ["'wizard'"]),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        "messages",
        ["'image_url'", "text parts"],
    ),
    ({"max_completion_tokens": 5000}, "max_completion_tokens", ["2048", "5000"]),
]


@pytest.mark.parametrize("change,param,needles", BAD_CHAT, ids=[p for _, p, _ in BAD_CHAT])
def test_bad_chat_parameters_are_400_naming_the_field(url, change, param, needles):
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 3,
        **change,
    }
    assert_error(post(url, "/v1/chat/completions", body), 400, param, *needles)
    assert_ok(url, "/v1/chat/completions")


def test_context_overflow_names_both_numbers(url):
    long_prompt = list(range(100)) * 20  # 2000 tokens of a 2048-token context
    err = assert_error(
        post(url, "/v1/completions", {**OK, "prompt": long_prompt, "max_tokens": 100}),
        400,
        "max_tokens",
        "2000 tokens",
        "max_tokens=100",
        "2048",
        "at most 48",
    )
    assert err["type"] == "invalid_request_error"
    assert_error(
        post(url, "/v1/completions", {**OK, "prompt": list(range(100)) * 21}),
        400,
        "prompt",
        "2100 tokens",
        "2048",
    )
    assert_ok(url)
    # the largest request that fits is served
    r = post(
        url, "/v1/completions", {**OK, "prompt": long_prompt, "max_tokens": 48, "ignore_eos": True}
    )
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 48


def test_bad_json_bodies_unknown_routes_and_ignored_fields(url):
    assert_error(post(url, "/v1/completions", content=b"{not json"), 400, None, "not valid JSON")
    assert_error(post(url, "/v1/completions", content=b""), 400, None, "empty")
    assert_error(post(url, "/v1/completions", content=b"[1, 2]"), 400, None, "JSON object")
    assert_ok(url)
    r = httpx.get(f"{url}/v1/nothing", headers=AUTH)
    assert_error(r, 404, None, "/v1/nothing")
    assert_error(httpx.get(f"{url}/v1/completions", headers=AUTH), 405, None, "GET")
    # fields the server does not know, or that change nothing here, are ignored
    r = post(
        url,
        "/v1/completions",
        {
            **OK,
            "user": "u1",
            "frobnicate": 3,
            "store": True,
            "presence_penalty": 0,
            "best_of": 1,
            "echo": False,
        },
    )
    assert r.status_code == 200, r.text


def test_unknown_model_is_404_and_the_key_is_required(url):
    err = assert_error(
        post(url, "/v1/completions", {**OK, "model": "gpt-5"}), 404, "model", "'gpt-5'", "'tiny'"
    )
    assert err["code"] == "model_not_found"
    assert_error(httpx.get(f"{url}/v1/models/other", headers=AUTH), 404, "model")
    assert_ok(url)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        err = assert_error(post(url, "/v1/completions", OK, headers=headers), 401, None, "API key")
        assert err["code"] == "invalid_api_key"
        assert httpx.get(f"{url}/v1/models", headers=headers).status_code == 401
    assert_ok(url)
    # probes and scrapers need no key
    assert httpx.get(f"{url}/health").status_code == 200
    assert httpx.get(f"{url}/metrics").status_code == 200
    # the openai client sends the key as a bearer token
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0).models.list()


def test_queue_full_is_429_and_disconnects_free_their_slots(url):
    long = {**OK, "max_tokens": 1900, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=url, headers=AUTH, timeout=60) as c:
        streams, contexts = [], []
        for _ in range(3):  # 2 running + 1 queued: full
            cm = c.stream("POST", "/v1/completions", json=long)
            resp = cm.__enter__()
            assert resp.status_code == 200
            contexts.append(cm)
            streams.append(resp)
        # the two running ones stream (iterators kept: a dropped one closes its response)
        lines = [resp.iter_lines() for resp in streams[:2]]
        assert all(next(it).startswith("data: ") for it in lines)
        err = assert_error(post(url, "/v1/completions", OK), 429, None, "full", "at most 3")
        assert err["code"] == "queue_full"
        m = httpx.get(f"{url}/metrics").text
        assert 'jaxturbo_request_errors_total{code="queue_full",status="429"}' in m
        for cm in contexts:  # the clients go away mid-stream
            cm.__exit__(None, None, None)
    text = wait_idle(url)
    assert "jaxturbo_num_requests_running 0.0" in text
    assert "jaxturbo_kv_pages_used 0.0" in text
    assert_ok(url)


def test_errors_are_counted_in_metrics(url):
    before = httpx.get(f"{url}/metrics").text
    post(url, "/v1/completions", {**OK, "temperature": -1})
    after = httpx.get(f"{url}/metrics").text

    def count(text: str) -> float:
        for line in text.splitlines():
            if line.startswith('jaxturbo_request_errors_total{code="None",status="400"}'):
                return float(line.split()[-1])
        return 0.0

    assert count(after) == count(before) + 1
    assert json.loads(post(url, "/v1/completions", OK).text)["usage"]["completion_tokens"] == 4
