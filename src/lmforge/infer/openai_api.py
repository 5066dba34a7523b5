"""The OpenAI wire format: validate request bodies, build responses and stream chunks.

Pure functions on dicts, no HTTP, so the server module stays about sockets and this one about
the protocol. Supported: /v1/completions and /v1/chat/completions with `max_tokens`
(`max_completion_tokens`), `temperature`, `top_p`, `n`, `stop`, `seed`, `stream`,
`stream_options.include_usage`; lmforge extensions `top_k` and `repetition_penalty`. Fields the
engine cannot honour (non-zero presence/frequency penalties, logprobs, logit_bias, suffix, tools)
are rejected with a 400 rather than silently ignored; fields that change nothing (`user`,
`model`) are accepted.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from lmforge.errors import LmforgeError
from lmforge.infer.sampling import SamplingParams

MAX_N = 8
MAX_STOP = 4


class ApiError(Exception):
    """An HTTP error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class ApiRequest:
    chat: bool
    prompts: list[list[int]]  # one per choice (prompt x n)
    n: int
    params: SamplingParams
    stream: bool
    include_usage: bool


def _number(body: dict, key: str, default: float, lo: float, hi: float, *, lo_open: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ApiError(400, f"'{key}' must be a number", key)
    if value < lo or value > hi or (lo_open and value == lo):
        raise ApiError(400, f"'{key}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {value}", key)
    return float(value)


def _integer(body: dict, key: str, default: int | None, lo: int, hi: int) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"'{key}' must be an integer", key)
    if not lo <= value <= hi:
        raise ApiError(400, f"'{key}' must be between {lo} and {hi}, got {value}", key)
    return value


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP:
        raise ApiError(400, f"'stop' must be a non-empty string or a list of up to {MAX_STOP} of them", "stop")
    return stop


# Fields whose other values would change the answer in ways this server does not implement.
ALLOWED_ONLY = {
    "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "logprobs": (None, False, 0),
    "top_logprobs": (None, 0), "logit_bias": (None, {}), "suffix": (None, ""), "tools": (None, []),
    "functions": (None, []), "best_of": (None, 1), "echo": (None, False),
    "response_format": (None, {"type": "text"}),
}


def _unsupported(body: dict) -> None:
    for key, allowed in ALLOWED_ONLY.items():
        if body.get(key) not in allowed:
            hint = " (use 'repetition_penalty')" if key.endswith("_penalty") else ""
            raise ApiError(400, f"'{key}'={body[key]!r} is not supported by this server{hint}", key)


def parse_request(body: object, *, chat: bool, tokenizer, context: int, max_tokens_limit: int) -> ApiRequest:
    """Validate a decoded JSON body and turn it into token-id prompts plus sampling parameters."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    if "model" in body and not isinstance(body["model"], str):
        raise ApiError(400, "'model' must be a string", "model")
    _unsupported(body)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options")
    n = _integer(body, "n", 1, 1, MAX_N)

    if chat:
        from lmforge.infer.chat import check_messages, render_messages

        try:
            texts = [render_messages(tokenizer, check_messages(body.get("messages")))]
        except LmforgeError as e:
            raise ApiError(400, str(e), "messages") from None
        prompts = [tokenizer.encode(t) for t in texts]
    else:
        from lmforge.infer.engine import encode_prompt

        prompt = body.get("prompt")
        if isinstance(prompt, str):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt or len(prompt) > MAX_N:
            raise ApiError(400, f"'prompt' must be a string or a list of 1 to {MAX_N} strings", "prompt")
        if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
            prompt = [prompt]  # a single prompt given as token ids
        prompts = []
        for p in prompt:
            if isinstance(p, str):
                prompts.append(encode_prompt(tokenizer, p))
            elif isinstance(p, list) and p and all(isinstance(t, int) and 0 <= t < tokenizer.vocab_size for t in p):
                prompts.append(list(p))
            else:
                raise ApiError(400, "'prompt' entries must be strings or lists of valid token ids", "prompt")
        if len(prompts) * n > MAX_N:
            raise ApiError(400, f"at most {MAX_N} choices per request (prompts x n)", "n")
    for p in prompts:
        if len(p) >= context:
            raise ApiError(400, f"the prompt has {len(p)} tokens; this model's context is {context} tokens "
                           "and a reply needs at least one more", "messages" if chat else "prompt",
                           "context_length_exceeded")

    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    default_max = max_tokens_limit if chat else min(16, max_tokens_limit)
    params = SamplingParams(
        max_new_tokens=_integer(body, key, default_max, 1, max_tokens_limit),
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        top_k=_integer(body, "top_k", 0, 0, 1_000_000),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.0, 10.0, lo_open=True),
        stop=_stop(body),
        seed=_integer(body, "seed", None, -(2**63), 2**63 - 1),
    )
    return ApiRequest(chat, [p for p in prompts for _ in range(n)], n, params, stream,
                      bool(options.get("include_usage")))


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


def usage(req: ApiRequest, completions) -> dict:
    prompt = sum(c.prompt_tokens for c in completions[::req.n])  # n copies of a prompt count once
    done = sum(c.completion_tokens for c in completions)
    return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}


def response(req: ApiRequest, rid: str, model: str, completions) -> dict:
    if req.chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
                    "finish_reason": c.finish_reason} for i, c in enumerate(completions)]
        obj = "chat.completion"
    else:
        choices = [{"index": i, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
                   for i, c in enumerate(completions)]
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": choices,
            "usage": usage(req, completions)}


def chunk(req: ApiRequest, rid: str, model: str, index: int, *, text: str | None = None,
          role: bool = False, finish_reason: str | None = None) -> dict:
    """One streamed chunk for choice `index`."""
    base = {"id": rid, "created": int(time.time()), "model": model}
    if req.chat:
        delta: dict = {}
        if role:
            delta = {"role": "assistant", "content": ""}
        elif text is not None:
            delta = {"content": text}
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {**base, "object": "chat.completion.chunk", "choices": [choice]}
    choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    return {**base, "object": "text_completion", "choices": [choice]}


def usage_chunk(req: ApiRequest, rid: str, model: str, completions) -> dict:
    return {"id": rid, "object": "chat.completion.chunk" if req.chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [], "usage": usage(req, completions)}
