"""The OpenAI wire format: validate request bodies, build responses and stream chunks.

Pure functions on dicts, no HTTP, so the server module stays about sockets and this one about
the protocol. Supported: /v1/completions and /v1/chat/completions with `model`, `max_tokens`
(`max_completion_tokens`), `temperature`, `top_p`, `n`, `stop`, `seed`, `stream`,
`stream_options.include_usage`; lmforge extensions `top_k` and `repetition_penalty`.

Log-probabilities, as the legacy completions API defines them: `echo` puts the prompt in front of
the text; `logprobs: N` (0..5) returns `tokens`, `token_logprobs` (null for the first prompt
token, which has no context), `top_logprobs` (the N most likely tokens at each position, null
where token_logprobs is) and `text_offset` (where each token starts in the returned text); with
`echo` and `max_tokens: 0` the prompt is only scored, which is what lm-eval's loglikelihood asks
for. Chat takes `logprobs: true` and `top_logprobs` (0..20) in the chat shape. The values are the
model's own log-probabilities (see infer/engine.py), whatever the sampling settings. Not with
`stream`: a request that asks for both gets a 400.

Fields the engine cannot honour (non-zero presence/frequency penalties, logit_bias, suffix,
tools, best_of) are rejected with a 400 rather than silently ignored; `user` changes nothing and
is accepted. A `model` other than the served one gets 404 `model_not_found`, as OpenAI and vLLM
answer; leaving `model` out is fine.
"""

from __future__ import annotations

import codecs
import time
import uuid
from dataclasses import dataclass
from functools import lru_cache

from tokenizers import decoders

from lmforge.errors import LmforgeError
from lmforge.infer.chat import check_messages, render_prompt
from lmforge.infer.engine import default_stop_ids, encode_prompt
from lmforge.infer.sampling import SamplingParams
from lmforge.tokenizer_formats import byte_chars

MAX_N = 8
MAX_STOP = 4
MAX_LOGPROBS = 5  # legacy completions (OpenAI's limit)
MAX_TOP_LOGPROBS = 20  # chat completions (OpenAI's limit)


class ApiError(Exception):
    """An HTTP error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def model_not_found(asked: str, served: str) -> ApiError:
    """OpenAI's answer to an unknown model: 404, code `model_not_found`, param null."""
    return ApiError(404, f"The model `{asked}` does not exist. This server serves `{served}` "
                    "(see /v1/models), or leave 'model' out.", code="model_not_found")


@dataclass
class ApiRequest:
    chat: bool
    prompts: list[list[int]]  # one per choice (prompt x n)
    n: int
    params: SamplingParams
    stream: bool
    include_usage: bool
    echo: bool = False  # completions: the prompt goes in front of the text
    top_logprobs: int | None = None  # None: no log-probabilities; else alternatives per token
    prompt_texts: list[str] | None = None  # one per choice, for echo: the prompt as the client gave it


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


def _flag(body: dict, key: str) -> bool:
    value = body.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(400, f"'{key}' must be true or false", key)
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
    "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "logit_bias": (None, {}), "suffix": (None, ""),
    "tools": (None, []), "functions": (None, []), "best_of": (None, 1), "response_format": (None, {"type": "text"}),
}
CHAT_ALLOWED_ONLY = {"echo": (None, False)}  # vLLM's chat `echo` extension is not implemented


def _unsupported(body: dict, chat: bool) -> None:
    for key, allowed in (ALLOWED_ONLY | (CHAT_ALLOWED_ONLY if chat else {})).items():
        if body.get(key) not in allowed:
            hint = " (use 'repetition_penalty')" if key.endswith("_penalty") else ""
            raise ApiError(400, f"'{key}'={body[key]!r} is not supported by this server{hint}", key)


def _logprobs(body: dict, chat: bool) -> int | None:
    """How many alternatives per token to return, or None for no log-probabilities."""
    if chat:
        if not _flag(body, "logprobs"):
            if body.get("top_logprobs") is not None:
                raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
            return None
        return _integer(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
    if body.get("logprobs") is False:  # what some clients send for "none"
        return None
    return _integer(body, "logprobs", None, 0, MAX_LOGPROBS)


def parse_request(body: object, *, chat: bool, tokenizer, context: int, max_tokens_limit: int,
                  model_name: str | None = None, encoder: bool = False) -> ApiRequest:
    """Validate a decoded JSON body and turn it into token-id prompts plus sampling parameters."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, "'model' must be a string", "model")
    if model is not None and model_name is not None and model != model_name:
        raise model_not_found(model, model_name)
    _unsupported(body, chat)
    stream = _flag(body, "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options")
    n = _integer(body, "n", 1, 1, MAX_N)
    echo = False if chat else _flag(body, "echo")
    top_logprobs = _logprobs(body, chat)
    if stream and top_logprobs is not None:
        raise ApiError(400, "'logprobs' with 'stream': true is not supported; send the request without stream",
                       "logprobs")

    texts: list[str] | None = None
    if chat:
        try:
            prompts = [render_prompt(tokenizer, check_messages(body.get("messages")))]
        except LmforgeError as e:
            raise ApiError(400, str(e), "messages") from None
    else:
        prompts, texts = _completion_prompts(body, tokenizer, encoder)
        if len(prompts) * n > MAX_N:
            raise ApiError(400, f"at most {MAX_N} choices per request (prompts x n)", "n")

    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    default_max = max_tokens_limit if chat else min(16, max_tokens_limit)
    # max_tokens 0 only makes sense with echo: the prompt is scored (or just returned), nothing new.
    max_new = _integer(body, key, default_max, 0 if echo else 1, max_tokens_limit)
    for p in prompts:
        if len(p) > context or (max_new > 0 and len(p) == context):
            more = " and a reply needs at least one more" if max_new > 0 else ""
            raise ApiError(400, f"the prompt has {len(p)} tokens; this model's context is {context} tokens{more}",
                           "messages" if chat else "prompt", "context_length_exceeded")
    params = SamplingParams(
        max_new_tokens=max_new,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        top_k=_integer(body, "top_k", 0, 0, 1_000_000),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.0, 10.0, lo_open=True),
        stop=_stop(body),
        seed=_integer(body, "seed", None, -(2**63), 2**63 - 1),
    )
    return ApiRequest(chat, [p for p in prompts for _ in range(n)], n, params, stream,
                      bool(options.get("include_usage")), echo, top_logprobs,
                      [t for t in texts for _ in range(n)] if echo and texts is not None else None)


def _completion_prompts(body: dict, tokenizer, encoder: bool = False) -> tuple[list[list[int]], list[str]]:
    """(token ids, text) of each prompt: a string, a list of strings, a list of ids or of id lists."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompt = [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        prompt = [prompt]  # a single prompt given as token ids
    if not isinstance(prompt, list) or not prompt or len(prompt) > MAX_N:
        raise ApiError(400, f"'prompt' must be a string, a list of token ids, or a list of 1 to {MAX_N} "
                       "of either", "prompt")
    ids, texts = [], []
    for p in prompt:
        if isinstance(p, str):
            ids.append(encode_prompt(tokenizer, p, encoder))
            texts.append(p)
        elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool)
                                               and 0 <= t < tokenizer.vocab_size for t in p):
            ids.append(list(p))
            texts.append(tokenizer.decode(p))
        else:
            raise ApiError(400, "'prompt' entries must be strings or lists of valid token ids", "prompt")
    return ids, texts


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


def usage(req: ApiRequest, completions) -> dict:
    prompt = sum(c.prompt_tokens for c in completions[::req.n])  # n copies of a prompt count once
    done = sum(c.completion_tokens for c in completions)
    return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}


# --- tokens as text -------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Byte-level BPE's printable stand-in for each byte (GPT-2's bytes_to_unicode), inverted."""
    return {c: b for b, c in enumerate(byte_chars())}


class TokenText:
    """Each token's raw bytes and its display string: the text when the bytes are valid UTF-8
    alone, else OpenAI's `bytes:\\xe6\\x9c` form (a token can hold part of a character)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        hf = getattr(tokenizer, "tok", None)
        self.hf = hf if hf is not None and isinstance(hf.decoder, decoders.ByteLevel) else None
        self.added = {i: t.content for i, t in hf.get_added_tokens_decoder().items()} if hf is not None else {}

    def bytes(self, token: int) -> bytes:
        if token in self.added:
            return self.added[token].encode()
        if self.hf is not None:
            piece, table = self.hf.id_to_token(token), _byte_decoder()
            if piece is not None and all(ch in table for ch in piece):
                return bytes(table[ch] for ch in piece)
        return self.tokenizer.decode([token]).encode()  # not byte-level: the token's own text

    def text(self, token: int) -> str:
        raw = self.bytes(token)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def completion_logprobs(tt: TokenText, c, prompt: list[int] | None, text: str, stop_ids: set[int]) -> dict:
    """The legacy `logprobs` object of one choice; `prompt` ids lead when echoed.

    text_offset counts characters of the returned text; a token that starts inside a character
    (byte-level BPE splits them) gets that character's offset, and a final stop token, which
    adds no text, the text's length.
    """
    ids = (prompt or []) + c.tokens
    scores = ((c.prompt_scores or [None] * len(prompt)) if prompt else []) + (c.scores or [])
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    offsets, at = [], 0
    for i, token in enumerate(ids):
        offsets.append(min(at, len(text)))
        if i < len(prompt or []) or token not in stop_ids:
            at += len(decoder.decode(tt.bytes(token)))
    return {
        "tokens": [tt.text(t) for t in ids],
        "token_logprobs": [s.logprob if s is not None else None for s in scores],
        "top_logprobs": [{tt.text(i): lp for i, lp in s.top} if s is not None else None for s in scores],
        "text_offset": offsets,
    }


def chat_logprobs(tt: TokenText, c, stop_ids: set[int]) -> dict:
    """The chat `logprobs` object: one entry per content token (the end-of-turn token is not content)."""
    def entry(token: int, logprob: float) -> dict:
        return {"token": tt.text(token), "logprob": logprob, "bytes": list(tt.bytes(token))}

    content = [{**entry(s.token, s.logprob), "top_logprobs": [entry(i, lp) for i, lp in s.top]}
               for s in c.scores or [] if s.token not in stop_ids]
    return {"content": content, "refusal": None}


def response(req: ApiRequest, rid: str, model: str, completions, tokenizer=None) -> dict:
    """The whole (non-streamed) answer; `tokenizer` is needed only for log-probabilities."""
    tt = TokenText(tokenizer) if req.top_logprobs is not None else None
    stop_ids = default_stop_ids(tokenizer) if tt is not None else set()
    choices = []
    for i, c in enumerate(completions):
        if req.chat:
            lp = chat_logprobs(tt, c, stop_ids) if tt is not None else None
            choices.append({"index": i, "message": {"role": "assistant", "content": c.text}, "logprobs": lp,
                            "finish_reason": c.finish_reason})
            continue
        text = (req.prompt_texts[i] if req.echo else "") + c.text
        lp = completion_logprobs(tt, c, req.prompts[i] if req.echo else None, text, stop_ids) if tt else None
        choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": c.finish_reason})
    return {"id": rid, "object": "chat.completion" if req.chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": choices, "usage": usage(req, completions)}


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
