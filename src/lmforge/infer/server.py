"""`lmforge serve`: an OpenAI-compatible HTTP server with a small web chat page at `/`.

    lmforge serve CKPT_OR_RUN_DIR [--host 127.0.0.1] [--port 8000] [--quantize int8|int4] [--api-key KEY]
                  [--max-batch 16] [--max-waiting 64] [--max-cached-tokens N]

Endpoints: GET /v1/models (and /v1/models/ID), POST /v1/completions, POST /v1/chat/completions
(with `stream: true` as server-sent events ending in `data: [DONE]`), GET /health, GET / (the
chat page). With an API key (--api-key or LMFORGE_API_KEY), every /v1 route needs
`Authorization: Bearer KEY`; / and /health stay open, and the page asks for the key.

Requests are decoded together in one continuously refilled batch (infer/batching.py): a scheduler
thread owns the model, admits waiting requests between decoding steps while the batch has rows and
cache room (`--max-batch`, `--max-cached-tokens`), and drops the rows of finished requests and of
clients that went away. Each request is sampled with its own parameters and seed, so its answer is the
one it gets alone. `--max-batch 1` serves one request at a time, as does a decoder the batch cannot
hold (sliding-window layers), which the start-up log names.

Why the standard library's ThreadingHTTPServer and not FastAPI/uvicorn: handler threads only parse,
queue and write, while the model runs in the one scheduler thread, so an async stack buys no
throughput here, and zero extra dependencies keeps `pip install lmforge` small and the whole request
path readable in three files. What a production front end would add is done by hand: a body-size
limit checked before reading, a listen backlog that absorbs bursts of connections, a per-read timeout
on the body, which is read whole before the request may take one of the bounded waiting places (429
with Retry-After past them), so a stalled client never holds one; an optional API key compared in
constant time, OpenAI-shaped JSON errors for every 4xx, and binding to 127.0.0.1 unless told
otherwise. Put a reverse proxy in front to expose it beyond one machine.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import os
import queue
import select
import socket
import sys
import time
import traceback
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path

from lmforge.cli import CommandParser
from lmforge.errors import LmforgeError
from lmforge.infer.batching import Busy, Job, Scheduler
from lmforge.infer.engine import context_length
from lmforge.infer.openai_api import (
    MAX_N,
    ApiError,
    ApiRequest,
    chunk,
    model_not_found,
    new_id,
    parse_request,
    response,
    usage_chunk,
)


class ClientGone(Exception):
    """The client closed the connection mid-stream: stop generating for it."""


class ModelService:
    """The model, its tokenizer and the scheduler that owns them (infer/batching.py)."""

    def __init__(self, model, tokenizer, name: str, max_tokens: int, max_waiting: int = 64, max_batch: int = 16,
                 max_cached_tokens: int = 0):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.context = context_length(model)
        self.max_tokens = max(1, min(max_tokens, self.context - 1))
        self.scheduler = Scheduler(model, tokenizer, max_batch=max_batch, max_waiting=max_waiting,
                                   max_cached_tokens=max_cached_tokens or max(max_batch, MAX_N) * self.context).start()

    def submit(self, req: ApiRequest) -> Job:
        """Queue the request's choices (Busy: the queue is full; LmforgeError: it can never fit)."""
        return self.scheduler.submit(Job(req.prompts, req.params, req.top_logprobs,
                                         score_prompt=req.echo and req.top_logprobs is not None, stream=req.stream))


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # socketserver's default backlog is 5: a burst of clients connecting at once overflows it, the
    # kernel drops their SYNs, and each waits a second to retry. Linux caps this at
    # net.core.somaxconn (4096 on current kernels).
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], service: ModelService, max_body: int, verbose: bool = False,
                 api_key: str | None = None, read_timeout: float = 10.0):
        super().__init__(address, Handler)
        self.service, self.max_body, self.verbose = service, max_body, verbose
        self.read_timeout = read_timeout
        # Only a digest is kept: comparing two digests of equal length takes the same time whatever
        # the key and whatever the client sent.
        self.key_digest = hashlib.sha256(api_key.encode()).digest() if api_key is not None else None

    def authorized(self, header: str | None) -> bool | None:
        """True when no key is set or `header` is `Bearer <key>`; None when no key was sent."""
        if self.key_digest is None:
            return True
        scheme, _, given = (header or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return None
        return hmac.compare_digest(hashlib.sha256(given.strip().encode()).digest(), self.key_digest)


def chat_page() -> bytes:
    return resources.files("lmforge.infer").joinpath("static/chat.html").read_bytes()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 120  # seconds a client may stall while sending; also bounds idle keep-alive
    server: Server
    server_version = "lmforge"

    # --- plumbing -----------------------------------------------------------------------------
    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        if self.server.verbose:
            super().log_message(format, *args)

    def _send(self, status: int, body: bytes, content_type: str, close: bool = False,
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: dict, close: bool = False, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj, ensure_ascii=False).encode("utf-8"), "application/json", close, headers)

    def _error(self, e: ApiError, close: bool = False, headers: dict[str, str] | None = None) -> None:
        self._json(e.status, e.body(), close, headers)

    def _body(self) -> object:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            raise ApiError(411, "send the body with a Content-Length, not chunked")
        length = self.headers.get("Content-Length")
        if length is None:
            raise ApiError(411, "a Content-Length header is required")
        try:
            n = int(length)
        except ValueError:
            raise ApiError(400, "Content-Length is not a number") from None
        if n < 0:
            raise ApiError(400, "Content-Length is negative")
        if n > self.server.max_body:
            raise ApiError(413, f"request body of {n} bytes exceeds the limit of {self.server.max_body}",
                           code="request_too_large")
        raw = self._read(n)
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON: {e}") from None

    def _read(self, n: int) -> bytes:
        """The body's n bytes. Each read may wait `read_timeout` seconds, not the connection's long
        idle timeout, so a client that sends headers and then stalls is answered 408 soon."""
        self.connection.settimeout(self.server.read_timeout)
        parts, got = [], 0
        try:
            while got < n:
                part = self.rfile.read1(min(n - got, 1 << 16))  # at most one recv: one timeout per read
                if not part:
                    raise ApiError(400, f"the connection closed after {got} of {n} body bytes")
                parts.append(part)
                got += len(part)
        except TimeoutError:
            raise ApiError(408, f"the client sent {got} of {n} body bytes, then nothing for "
                           f"{self.server.read_timeout:g} s", code="request_timeout") from None
        finally:
            self.connection.settimeout(self.timeout)
        return b"".join(parts)

    def _check_key(self) -> bool:
        """Answer 401 (OpenAI's shape) unless the request carries the server's key."""
        ok = self.server.authorized(self.headers.get("Authorization"))
        if ok:
            return True
        if ok is None:
            e = ApiError(401, "You didn't provide an API key. This server needs one: send "
                         "'Authorization: Bearer KEY' (the key lmforge serve was started with).")
        else:
            e = ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
        # Closed: the request's body, if any, is left unread.
        self._error(e, close=True, headers={"WWW-Authenticate": 'Bearer realm="lmforge"'})
        return False

    # --- routes -------------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = self.path.split("?", 1)[0]
        s = self.server.service
        if path in ("/", "/index.html"):
            self._send(200, chat_page(), "text/html; charset=utf-8")
        elif path == "/health":
            self._json(200, {"status": "ok"})
        elif path.startswith("/v1/") and not self._check_key():
            return
        elif path == "/v1/models":
            self._json(200, {"object": "list", "data": [self._model_card()]})
        elif path.startswith("/v1/models/"):
            name = urllib.parse.unquote(path[len("/v1/models/"):])
            if name == s.name:
                self._json(200, self._model_card())
            else:
                self._error(model_not_found(name, s.name))
        else:
            self._error(ApiError(404, f"no route GET {path}", code="not_found"))

    def _model_card(self) -> dict:
        s = self.server.service
        return {"id": s.name, "object": "model", "created": 0, "owned_by": "lmforge",
                "context_length": s.context, "max_tokens": s.max_tokens}

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0]
        routes = {"/v1/completions": False, "/v1/chat/completions": True}
        if path not in routes:
            self._error(ApiError(404, f"no route POST {path}", code="not_found"), close=True)
            return
        if not self._check_key():
            return
        s = self.server.service
        # The body is read and checked before the request is queued: the queue bounds requests waiting
        # for the model, and a client still sending (or stalled) must not hold a place in it.
        try:
            try:
                body = self._body()
            except ApiError as e:
                self._error(e, close=True)  # the body may be partly unread: the connection cannot be reused
                return
            try:
                if getattr(s.model, "is_encoder_decoder", False) and routes[path]:
                    raise ApiError(400, "this model is an encoder-decoder (model.arch=t5) with no chat template: "
                                   "send its source text to /v1/completions", code="unsupported_model")
                req = parse_request(body, chat=routes[path], tokenizer=s.tokenizer, context=s.context,
                                    max_tokens_limit=s.max_tokens, model_name=s.name,
                                    encoder=getattr(s.model, "is_encoder_decoder", False))
                if getattr(s.model, "is_encoder_decoder", False) and req.echo and req.top_logprobs is not None:
                    raise ApiError(400, "echo with logprobs scores prompt tokens, which an encoder-decoder does not "
                                   "predict", param="echo")
                job = s.submit(req)
            except ApiError as e:
                self._error(e)
                return
            except Busy as e:
                self._error(ApiError(429, str(e), code="server_busy", kind="rate_limit_error"),
                            headers={"Retry-After": str(e.retry_after)})
                return
            except LmforgeError as e:
                self._error(ApiError(400, str(e), "max_tokens", "request_too_large"))
                return
            try:
                if req.stream:
                    self._stream(req, job)
                else:
                    self._json(200, response(req, new_id(req.chat), s.name, self._wait(job), s.tokenizer))
            except BaseException:
                job.cancel()  # whatever ended this request, its rows leave the batch
                raise
        except (BrokenPipeError, ConnectionResetError, ClientGone):
            self.close_connection = True
        except Exception:  # a bug, not the client's fault: log it, answer 500 in the same shape
            traceback.print_exc(file=sys.stderr)
            try:
                self._error(ApiError(500, "internal error (see the server log)", kind="server_error"), close=True)
            except OSError:
                pass

    def _client_gone(self) -> bool:
        """Whether the client closed its end: the socket reads as end-of-file (a pipelined next
        request would read as data, and is left where it is)."""
        try:
            ready, _, _ = select.select([self.connection], [], [], 0)
            return bool(ready) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _events(self, job: Job):
        """The job's events as the scheduler sends them; ClientGone once the client has left."""
        checked = time.monotonic()
        while True:
            try:
                event = job.events.get(timeout=0.25)
            except queue.Empty:
                event = None
            if time.monotonic() - checked >= 0.25:  # text events may never leave the queue empty
                if self._client_gone():
                    raise ClientGone()
                checked = time.monotonic()
            if event is None:
                continue
            yield event
            if event[0] != "text":
                return

    def _wait(self, job: Job) -> list:
        for kind, *rest in self._events(job):
            if kind == "error":
                raise rest[0]
            if kind == "done":
                return rest[0]
        raise AssertionError("the scheduler ended a job without an answer")

    # --- server-sent events -------------------------------------------------------------------
    def _write_chunk(self, data: bytes) -> None:
        try:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, OSError) as e:
            raise ClientGone() from e

    def _event(self, obj: dict | str) -> None:
        payload = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
        self._write_chunk(f"data: {payload}\n\n".encode())

    def _stream(self, req: ApiRequest, job: Job) -> None:
        s = self.server.service
        rid = new_id(req.chat)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("X-Accel-Buffering", "no")
        self.end_headers()
        for i in range(len(req.prompts)):
            if req.chat:
                self._event(chunk(req, rid, s.name, i, role=True))
            elif req.echo:
                self._event(chunk(req, rid, s.name, i, text=req.prompt_texts[i]))
        completions = None
        for kind, *rest in self._events(job):
            if kind == "text":
                self._event(chunk(req, rid, s.name, rest[0], text=rest[1]))
            elif kind == "done":
                completions = rest[0]
            else:  # headers are sent: report in-band, as OpenAI does, then end the stream
                traceback.print_exception(rest[0], file=sys.stderr)
                self._event(ApiError(500, "internal error (see the server log)", kind="server_error").body())
                self._write_chunk(b"")
                self.close_connection = True
                return
        for i, c in enumerate(completions):
            self._event(chunk(req, rid, s.name, i, finish_reason=c.finish_reason))
        if req.include_usage:
            self._event(usage_chunk(req, rid, s.name, completions))
        self._event("[DONE]")
        self._write_chunk(b"")  # the zero-length chunk ends the response


def model_name(ckpt: Path) -> str:
    """The run's name for RUN/checkpoints/step_N, else the folder's name."""
    if ckpt.parent.name == "checkpoints":
        return f"{ckpt.parent.parent.resolve().name}/{ckpt.name}"
    return ckpt.resolve().name


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def api_key_from(flag: str | None, env: dict[str, str]) -> str | None:
    """--api-key wins over LMFORGE_API_KEY; an empty environment variable means no key."""
    if flag is not None:
        if not flag.strip():
            raise LmforgeError("--api-key is empty: give a key, or leave the flag out to serve without one")
        return flag.strip()
    return env.get("LMFORGE_API_KEY", "").strip() or None


def batch_settings(args, serve) -> tuple[int, int, int]:
    """(max_batch, max_waiting, max_cached_tokens): each flag wins over its `serve.*` key."""
    values = []
    for flag, key, low in (("max_batch", "max_batch", 1), ("max_waiting", "max_waiting", 1),
                           ("max_cached_tokens", "max_cached_tokens", 0)):
        value = getattr(serve, key) if getattr(args, flag) is None else getattr(args, flag)
        if value < low:
            raise LmforgeError(f"--{flag.replace('_', '-')} (serve.{key}) must be at least {low}, got {value}")
        values.append(value)
    return values[0], values[1], values[2]


def cmd_serve(argv: list[str]) -> int:
    from lmforge.infer.cli import add_model_args, split_items

    ap = CommandParser("serve", "OpenAI-compatible HTTP server + web chat.")
    ap.add_argument("items", nargs="*", metavar="CKPT_OR_RUN_DIR | recipe.yaml | key=value")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    ap.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    ap.add_argument("--model-name", default=None, help="the id /v1/models reports; requests naming another get 404")
    ap.add_argument("--api-key", default=None,
                    help="require 'Authorization: Bearer KEY' on /v1 (default: $LMFORGE_API_KEY, which other users "
                         "cannot read in the process list; without either, no key)")
    ap.add_argument("--max-tokens", type=int, default=512, help="upper bound (and chat default) for max_tokens")
    ap.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413")
    ap.add_argument("--max-batch", type=int, default=None,
                    help="sequences decoded together, joining and leaving as they come (serve.max_batch, default "
                         "16); 1: one request at a time")
    ap.add_argument("--max-waiting", type=int, default=None,
                    help="requests queued for the batch beyond this get 429 + Retry-After (serve.max_waiting, 64)")
    ap.add_argument("--max-cached-tokens", type=int, default=None,
                    help="KV-cache positions the batch may hold, padding included; a request waits until it fits "
                         "(serve.max_cached_tokens; default max(max-batch, 8) x context, room for 8 choices)")
    ap.add_argument("--read-timeout", type=float, default=10.0,
                    help="seconds a client may pause while sending a request body (then 408)")
    ap.add_argument("--verbose", action="store_true", help="log every request")
    add_model_args(ap)
    args = ap.parse_intermixed_args(argv)
    target, cfg = split_items(args.items)
    api_key = api_key_from(args.api_key, dict(os.environ))
    if args.read_timeout <= 0:
        raise LmforgeError(f"--read-timeout must be > 0 seconds, got {args.read_timeout}")
    max_batch, max_waiting, max_cached = batch_settings(args, cfg.serve)

    from lmforge.infer.loading import load_for_inference

    model, tokenizer, ckpt = load_for_inference(target, args.device or cfg.device, args.dtype, args.quantize)
    service = ModelService(model, tokenizer, args.model_name or model_name(ckpt), args.max_tokens, max_waiting,
                           max_batch, max_cached)
    sched = service.scheduler
    if sched.batched:
        mode = f"continuous batching of up to {max_batch} sequences, {sched.max_cached_tokens} cache positions"
    else:
        mode = "one request at a time" + (f": {sched.refusal}" if max_batch > 1 else " (--max-batch 1)")
    print(f"lmforge serve: {mode}, at most {max_waiting} waiting", file=sys.stderr, flush=True)
    server = Server((args.host, args.port), service, args.max_body_bytes, args.verbose, api_key, args.read_timeout)
    host, port = server.server_address[:2]
    access = "API key required" if api_key else "no API key"
    print(f"lmforge serve: {service.name} at http://{host}:{port}/ (OpenAI API under /v1, {access}); Ctrl-C stops",
          file=sys.stderr, flush=True)
    if api_key is None and not _is_loopback(host):
        print(f"lmforge serve: listening on {host} without an API key: anyone who can reach this address can "
              "use the model (set --api-key or LMFORGE_API_KEY)", file=sys.stderr, flush=True)
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
