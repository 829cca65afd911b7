"""Request bodies of the OpenAI API -> what the engine runs (`Job`), with OpenAI's checks.

    job = parse_completion(body, limits, tokenizer)          # POST /v1/completions
    job = parse_chat(body, limits, tokenizer, chat_stop_ids) # POST /v1/chat/completions

Every bad value raises `APIError(400)` naming the field and its valid range; an unknown model is
a 404.  Fields are treated three ways:
  - supported: model, prompt / messages, max_tokens, max_completion_tokens (chat), temperature,
    top_p, n, seed, stop, logprobs, top_logprobs (chat), stream, stream_options.include_usage,
    user; and the extensions top_k, min_p, stop_token_ids, ignore_eos, return_token_ids;
  - refused (400) when set to a value that would change the result: tools, functions,
    tool_choice / function_call other than "none", response_format other than text, logit_bias,
    presence_penalty / frequency_penalty other than 0, repetition_penalty other than 1, echo,
    suffix, best_of other than n, audio, modalities other than ["text"], prediction;
  - anything else is ignored (logged at debug level), as OpenAI's server ignores what it does not
    know.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from typing import Any

from jaxturbo.data.chat import encode_chat, has_chat_template
from jaxturbo.errors import UserError
from jaxturbo.inference.engine.params import SEED_MODULUS, RequestParams
from jaxturbo.serve.errors import APIError, invalid

log = logging.getLogger(__name__)

MAX_N = 128  # most samples one request may ask for (OpenAI's limit)
MAX_STOP = 16  # most stop strings / stop token ids one request may give
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default of the legacy completions endpoint

SAMPLING_FIELDS = {
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "user",
    "logprobs",
    "top_k",
    "min_p",
    "stop_token_ids",
    "ignore_eos",
    "return_token_ids",
}
COMPLETION_FIELDS = SAMPLING_FIELDS | {"prompt", "echo", "suffix", "best_of"}
CHAT_FIELDS = SAMPLING_FIELDS | {
    "messages",
    "max_completion_tokens",
    "top_logprobs",
    "tools",
    "functions",
    "tool_choice",
    "function_call",
    "response_format",
    "audio",
    "modalities",
    "prediction",
}
# fields that change the result unless left at their neutral value: (neutral values, why)
NEUTRAL = {
    "logit_bias": ((None, {}), "logit_bias is not supported"),
    "presence_penalty": (
        (None, 0, 0.0),
        "presence_penalty is not supported; give 0 or leave it out",
    ),
    "frequency_penalty": (
        (None, 0, 0.0),
        "frequency_penalty is not supported; give 0 or leave it out",
    ),
    "repetition_penalty": (
        (None, 1, 1.0),
        "repetition_penalty is not supported; give 1 or leave it out",
    ),
}
CHAT_NEUTRAL = {
    "tools": ((None, []), "tools (function calling) are not supported"),
    "functions": ((None, []), "functions (function calling) are not supported"),
    "tool_choice": ((None, "none"), 'tool_choice is not supported (no tools); give "none"'),
    "function_call": ((None, "none"), 'function_call is not supported; give "none"'),
    "audio": ((None,), "audio output is not supported"),
    "modalities": ((None, ["text"]), 'only text output is supported: modalities ["text"]'),
    "prediction": ((None,), "predicted outputs (prediction) are not supported"),
}
COMPLETION_NEUTRAL = {
    "echo": ((None, False), "echo is not supported; give false or leave it out"),
    "suffix": ((None, ""), "suffix (insertion) is not supported"),
}
CHAT_ROLES = ("system", "developer", "user", "assistant")


@dataclasses.dataclass(frozen=True)
class Limits:
    """What the server can do, which the checks compare against.

    model_name: the served name (`model` must equal it).  max_model_len: prompt + generated
    tokens of one request.  vocab_size: token ids must be below it.  max_logprobs: most
    alternatives per token (the engine's max_top_logprobs).  sort_sampling: top_k / top_p are
    compiled in.  max_samples: most samples (n x prompts) one request may hold at once."""

    model_name: str
    max_model_len: int
    vocab_size: int
    max_logprobs: int = 20
    sort_sampling: bool = True
    max_samples: int = MAX_N


@dataclasses.dataclass
class Job:
    """One parsed generation request.

    prompts: token ids of each prompt (chat: one); params: the engine settings of every prompt
    (n samples each); logprobs: None when not asked for, else the alternatives per token;
    return_token_ids: add the token ids to the response (extension)."""

    kind: str  # "chat" | "completion"
    prompts: list[list[int]]
    params: RequestParams
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None
    return_token_ids: bool = False

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.params.n


# ----------------------------------------------------------------------------- field checks
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(body: dict, name: str, lo: int, hi: int | None, default: Any) -> Any:
    v = body.get(name)
    if v is None:
        return default
    if not _is_int(v) or v < lo or (hi is not None and v > hi):
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise invalid(
            name, f"{name}={v!r} must be an integer {'in ' if hi is not None else ''}{rng}"
        )
    return v


def _float(
    body: dict, name: str, lo: float, hi: float, default: float, *, lo_open: bool = False
) -> float:
    v = body.get(name)
    if v is None:
        return default
    ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    if not ok or v > hi or v < lo or (lo_open and v == lo):
        rng = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise invalid(name, f"{name}={v!r} must be a number in {rng}")
    return float(v)


def _bool(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise invalid(name, f"{name}={v!r} must be true or false")
    return v


def _token_ids(name: str, ids: Any, vocab: int) -> list[int]:
    if not isinstance(ids, list) or not all(_is_int(t) for t in ids):
        raise invalid(name, f"{name} must be a list of integer token ids")
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise invalid(
            name, f"{name} contains token id {bad}; token ids must be in [0, {vocab - 1}]"
        )
    return ids


def _stop(body: dict) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise invalid("stop", f"stop={v!r} must be a string or a list of strings")
    if len(stops) > MAX_STOP or any(not s for s in stops):
        raise invalid("stop", f"stop={v!r} must hold 1 to {MAX_STOP} non-empty strings")
    return stops


def check_model(body: dict, limits: Limits) -> None:
    """404 when `model` names another model (leaving it out means the served one)."""
    model = body.get("model")
    if model is not None and model != limits.model_name:
        raise APIError(
            404,
            f"the model {model!r} does not exist; this server serves "
            f"{limits.model_name!r} (GET /v1/models)",
            param="model",
            code="model_not_found",
        )


def _refuse(body: dict, table: dict) -> None:
    for name, (neutral, why) in table.items():
        if name in body and body[name] not in neutral:
            raise invalid(name, f"{why} (got {name}={body[name]!r})")


def _note_unknown(body: dict, known: set[str], endpoint: str) -> None:
    extra = sorted(set(body) - known - set(NEUTRAL))
    if extra:
        log.debug("%s: ignoring unknown fields %s", endpoint, extra)


def _body(body: Any) -> dict:
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


# ----------------------------------------------------------------------------- common part
def _sampling(
    body: dict,
    limits: Limits,
    kind: str,
    prompts: list[list[int]],
    extra_stop_ids: Sequence[int] = (),
) -> Job:
    """Everything but the prompt: sampling, stops, logprobs, streaming, the context check."""
    n = _int(body, "n", 1, MAX_N, 1)
    if n * len(prompts) > limits.max_samples:
        raise invalid(
            "n",
            f"n={n} x {len(prompts)} prompt(s) = {n * len(prompts)} samples; this "
            f"server holds at most {limits.max_samples} at once (--max-num-seqs + "
            "--max-queue)",
        )
    temperature = _float(body, "temperature", 0.0, 2.0, 1.0)
    top_p = _float(body, "top_p", 0.0, 1.0, 1.0, lo_open=True)
    top_k = _int(body, "top_k", -1, None, 0)
    top_k = 0 if top_k == -1 else top_k  # -1: off, as vLLM spells it
    min_p = _float(body, "min_p", 0.0, 1.0, 0.0)
    if temperature > 0 and (top_k > 0 or top_p < 1.0) and not limits.sort_sampling:
        param = "top_k" if top_k > 0 else "top_p"
        raise invalid(
            param,
            f"top_k={top_k} / top_p={top_p} are not enabled on this server "
            "(started without top-k/top-p sampling); leave them out",
        )
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise invalid("seed", f"seed={seed!r} must be an integer")
    stop = _stop(body)
    stop_ids = body.get("stop_token_ids")
    stop_ids = [] if stop_ids is None else _token_ids("stop_token_ids", stop_ids, limits.vocab_size)
    if len(stop_ids) > MAX_STOP * 64:
        raise invalid(
            "stop_token_ids", f"stop_token_ids holds {len(stop_ids)} ids; at most {MAX_STOP * 64}"
        )
    logprobs: int | None
    if kind == "chat":
        want = _bool(body, "logprobs")
        top = _int(body, "top_logprobs", 0, limits.max_logprobs, None)
        if top is not None and not want:
            raise invalid("top_logprobs", "top_logprobs needs logprobs=true")
        logprobs = (top or 0) if want else None
    else:
        logprobs = _int(body, "logprobs", 0, limits.max_logprobs, None)
    if kind == "completion":
        best_of = body.get("best_of")
        if best_of is not None and best_of != n:
            raise invalid(
                "best_of",
                f"best_of={best_of!r} is not supported except equal to "
                f"n={n} (no ranking of samples); leave it out",
            )
    stream = _bool(body, "stream")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise invalid("stream_options", f"stream_options={opts!r} must be an object")
    include_usage = bool(stream and opts and _bool(opts, "include_usage"))
    ignore_eos = _bool(body, "ignore_eos")
    return_ids = _bool(body, "return_token_ids")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise invalid("user", f"user={user!r} must be a string")

    # max_tokens: explicit, else the rest of the context (chat) or 16 (legacy completions)
    name = "max_tokens"
    max_tokens = _int(body, "max_tokens", 1, None, None)
    if kind == "chat" and body.get("max_completion_tokens") is not None:
        name = "max_completion_tokens"
        max_tokens = _int(body, name, 1, None, None)
    longest = max(map(len, prompts))
    room = limits.max_model_len - longest
    what = "messages" if kind == "chat" else "prompt"
    if room < 1:
        raise invalid(
            what,
            f"the {what} has {longest} tokens; this model's context is "
            f"{limits.max_model_len} tokens (--max-model-len), which leaves no "
            "room to generate: shorten it",
        )
    if max_tokens is None:
        max_tokens = room if kind == "chat" else min(COMPLETION_DEFAULT_MAX_TOKENS, room)
    elif longest + max_tokens > limits.max_model_len:
        raise invalid(
            name,
            f"the {what} has {longest} tokens and {name}={max_tokens}: "
            f"{longest + max_tokens} tokens exceed this model's context of "
            f"{limits.max_model_len} tokens; lower {name} to at most {room}",
        )
    try:
        params = RequestParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            seed=None if seed is None else seed % SEED_MODULUS,
            stop_token_ids=tuple(dict.fromkeys([*stop_ids, *extra_stop_ids])),
            stop=tuple(stop),
            n=n,
            logprobs=logprobs is not None,
            top_logprobs=logprobs or 0,
            ignore_eos=ignore_eos,
        )
    except UserError as e:  # every field was checked above; keep the message if one slips by
        raise APIError(400, str(e)) from None
    return Job(
        kind,
        prompts,
        params,
        stream=stream,
        include_usage=include_usage,
        logprobs=logprobs,
        return_token_ids=return_ids,
    )


# ----------------------------------------------------------------------------- endpoints
def completion_prompts(prompt: Any, tokenizer: Any, vocab: int) -> list[list[int]]:
    """`prompt`: a string, a list of strings, a list of token ids or a list of such lists."""
    if prompt is None:
        raise invalid(
            "prompt",
            "prompt is required: a string, a list of strings, a list of "
            "token ids or a list of token-id lists",
        )
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        items = [prompt]
    elif isinstance(prompt, list) and prompt:
        items = prompt
    else:
        raise invalid(
            "prompt",
            f"prompt={prompt!r} must be a non-empty string, list of strings, "
            "list of token ids or list of token-id lists",
        )
    out = []
    for p in items:
        if isinstance(p, str):
            if tokenizer is None:
                raise invalid(
                    "prompt", "this server has no tokenizer: give the prompt as token ids"
                )
            ids = list(tokenizer.encode(p))
        elif isinstance(p, list) and p:
            ids = _token_ids("prompt", p, vocab)
        else:
            raise invalid(
                "prompt", f"prompt item {p!r} must be a non-empty string or list of token ids"
            )
        if not ids:
            raise invalid("prompt", f"prompt {p!r} encodes to no tokens; give some text")
        out.append(ids)
    return out


def parse_completion(body: Any, limits: Limits, tokenizer: Any) -> Job:
    """POST /v1/completions."""
    body = _body(body)
    check_model(body, limits)
    _refuse(body, NEUTRAL)
    _refuse(body, COMPLETION_NEUTRAL)
    _note_unknown(body, COMPLETION_FIELDS, "completions")
    prompts = completion_prompts(body.get("prompt"), tokenizer, limits.vocab_size)
    return _sampling(body, limits, "completion", prompts)


def chat_messages(messages: Any) -> list[dict[str, str]]:
    """The conversation as {role, content} with text content (text parts joined)."""
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "messages must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise invalid("messages", f"{where} must be an object with role and content")
        role = m.get("role")
        if role not in CHAT_ROLES:
            extra = (
                " (tool results need tools, which are not supported)"
                if role in ("tool", "function")
                else ""
            )
            raise invalid(
                "messages", f"{where}.role={role!r} must be one of {', '.join(CHAT_ROLES)}{extra}"
            )
        content = m.get("content")
        if content is None and role == "assistant":
            content = ""
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if (
                    not isinstance(part, dict)
                    or part.get("type") != "text"
                    or not isinstance(part.get("text"), str)
                ):
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise invalid(
                        "messages",
                        f"{where}.content[{j}] has type {kind!r}; only "
                        'text parts ({"type": "text", "text": '
                        "...}) are supported",
                    )
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise invalid("messages", f"{where}.content must be a string or a list of text parts")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def parse_chat(body: Any, limits: Limits, tokenizer: Any, chat_stop_ids: Sequence[int] = ()) -> Job:
    """POST /v1/chat/completions: the messages rendered by the model's chat template; a turn also
    ends at the template's end-of-turn tokens (`chat_stop_ids`)."""
    body = _body(body)
    check_model(body, limits)
    _refuse(body, NEUTRAL)
    _refuse(body, CHAT_NEUTRAL)
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise invalid(
            "response_format", f'response_format={fmt!r} is not supported; only {{"type": "text"}}'
        )
    _note_unknown(body, CHAT_FIELDS, "chat.completions")
    messages = chat_messages(body.get("messages"))
    if tokenizer is None or not has_chat_template(tokenizer):
        raise APIError(
            400,
            "this model has no chat template; use /v1/completions",
            param="messages",
            code="no_chat_template",
        )
    try:
        ids = encode_chat(tokenizer, messages)
    except Exception as e:  # noqa: BLE001 - a template's own refusal (e.g. role order)
        raise invalid("messages", f"the chat template refused the messages: {e}") from None
    return _sampling(body, limits, "chat", [ids], chat_stop_ids)
