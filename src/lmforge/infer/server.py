"""`lmforge serve`: an OpenAI-compatible HTTP server with a small web chat page at `/`.

    lmforge serve CKPT_OR_RUN_DIR [--host 127.0.0.1] [--port 8000] [--quantize int8|int4]

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (with `stream: true`
as server-sent events ending in `data: [DONE]`), GET /health, GET / (the chat page).

Why the standard library's ThreadingHTTPServer and not FastAPI/uvicorn: the model runs one
generation at a time behind a lock anyway (correctness first: outputs can never mix), so an async
stack buys no throughput here, while zero extra dependencies keeps `pip install lmforge` small and
the whole request path readable in two files. What a production front end would add is done by
hand: a body-size limit checked before reading, socket timeouts against slow clients, a bound on
waiting requests (429 past it), OpenAI-shaped JSON errors for every 4xx, and binding to
127.0.0.1 unless told otherwise. Put a reverse proxy in front to expose it beyond one machine.
"""

from __future__ import annotations

import json
import sys
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path

from lmforge.cli import CommandParser
from lmforge.infer.openai_api import ApiError, ApiRequest, chunk, new_id, parse_request, response, usage_chunk


class ClientGone(Exception):
    """The client closed the connection mid-stream: stop generating for it."""


class ModelService:
    """The model, its tokenizer and the lock that serializes generations."""

    def __init__(self, model, tokenizer, name: str, max_tokens: int, max_waiting: int = 64):
        from lmforge.infer.engine import context_length

        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.context = context_length(model)
        self.max_tokens = max(1, min(max_tokens, self.context - 1))
        self.lock = threading.Lock()
        self.slots = threading.BoundedSemaphore(max_waiting)

    def run(self, req: ApiRequest, on_text=None):
        from lmforge.infer.engine import complete_ids

        with self.lock:
            return complete_ids(self.model, self.tokenizer, req.prompts, req.params, on_text=on_text)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], service: ModelService, max_body: int, verbose: bool = False):
        super().__init__(address, Handler)
        self.service, self.max_body, self.verbose = service, max_body, verbose


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

    def _send(self, status: int, body: bytes, content_type: str, close: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: dict, close: bool = False) -> None:
        self._send(status, json.dumps(obj, ensure_ascii=False).encode("utf-8"), "application/json", close)

    def _error(self, e: ApiError, close: bool = False) -> None:
        self._json(e.status, e.body(), close)

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
        raw = self.rfile.read(n)
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON: {e}") from None

    # --- routes -------------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            self._send(200, chat_page(), "text/html; charset=utf-8")
        elif path == "/v1/models":
            s = self.server.service
            self._json(200, {"object": "list", "data": [{"id": s.name, "object": "model", "created": 0,
                                                         "owned_by": "lmforge", "context_length": s.context,
                                                         "max_tokens": s.max_tokens}]})
        elif path == "/health":
            self._json(200, {"status": "ok"})
        else:
            self._error(ApiError(404, f"no route GET {path}", code="not_found"))

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0]
        routes = {"/v1/completions": False, "/v1/chat/completions": True}
        if path not in routes:
            self._error(ApiError(404, f"no route POST {path}", code="not_found"), close=True)
            return
        s = self.server.service
        if not s.slots.acquire(blocking=False):
            self._error(ApiError(429, "too many requests waiting; retry later", code="server_busy",
                                 kind="rate_limit_error"), close=True)
            return
        try:
            try:
                body = self._body()
                req = parse_request(body, chat=routes[path], tokenizer=s.tokenizer, context=s.context,
                                    max_tokens_limit=s.max_tokens)
            except ApiError as e:
                self._error(e, close=e.status in (411, 413))
                return
            if req.stream:
                self._stream(req)
            else:
                completions = s.run(req)
                self._json(200, response(req, new_id(req.chat), s.name, completions))
        except (BrokenPipeError, ConnectionResetError, ClientGone):
            self.close_connection = True
        except Exception:  # a bug, not the client's fault: log it, answer 500 in the same shape
            traceback.print_exc(file=sys.stderr)
            try:
                self._error(ApiError(500, "internal error (see the server log)", kind="server_error"), close=True)
            except OSError:
                pass
        finally:
            s.slots.release()

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

    def _stream(self, req: ApiRequest) -> None:
        s = self.server.service
        rid = new_id(req.chat)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("X-Accel-Buffering", "no")
        self.end_headers()
        if req.chat:
            for i in range(len(req.prompts)):
                self._event(chunk(req, rid, s.name, i, role=True))
        try:
            completions = s.run(req, on_text=lambda row, text: self._event(chunk(req, rid, s.name, row, text=text)))
        except ClientGone:
            raise
        except Exception:  # headers are sent: report in-band, as OpenAI does, then end the stream
            traceback.print_exc(file=sys.stderr)
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


def cmd_serve(argv: list[str]) -> int:
    from lmforge.infer.cli import add_model_args, split_items

    ap = CommandParser("serve", "OpenAI-compatible HTTP server + web chat.")
    ap.add_argument("items", nargs="*", metavar="CKPT_OR_RUN_DIR | recipe.yaml | key=value")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    ap.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    ap.add_argument("--model-name", default=None, help="the id /v1/models reports")
    ap.add_argument("--max-tokens", type=int, default=512, help="upper bound (and chat default) for max_tokens")
    ap.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413")
    ap.add_argument("--max-waiting", type=int, default=64, help="requests queued beyond this get 429")
    ap.add_argument("--verbose", action="store_true", help="log every request")
    add_model_args(ap)
    args = ap.parse_intermixed_args(argv)
    target, cfg = split_items(args.items)

    from lmforge.infer.loading import load_for_inference

    model, tokenizer, ckpt = load_for_inference(target, args.device or cfg.device, args.dtype, args.quantize)
    service = ModelService(model, tokenizer, args.model_name or model_name(ckpt), args.max_tokens, args.max_waiting)
    server = Server((args.host, args.port), service, args.max_body_bytes, args.verbose)
    host, port = server.server_address[:2]
    print(f"lmforge serve: {service.name} at http://{host}:{port}/ (OpenAI API under /v1); Ctrl-C stops",
          file=sys.stderr, flush=True)
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
