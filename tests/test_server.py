"""`lmforge serve` as a real subprocess on 127.0.0.1: the official openai client, concurrency,
4xx errors, and the web page driven by headless Chromium over the DevTools protocol."""

from __future__ import annotations

import http.client
import json
import os
import queue
import re
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import torch
from infer_helpers import make_checkpoint, one_thread  # noqa: F401 (fixture)

from lmforge.checkpoint import load_model
from lmforge.infer.chat import render_messages
from lmforge.infer.engine import complete, complete_ids
from lmforge.infer.sampling import SamplingParams
from lmforge.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

GREEDY = dict(temperature=0.0, top_k=0, top_p=1.0)


class Served:
    def __init__(self, url: str, ckpt: Path, proc: subprocess.Popen, api_key: str | None = None):
        self.url, self.ckpt, self.proc = url, ckpt, proc
        self.host, self.port = url.split("//")[1].split(":")[0], int(url.rsplit(":", 1)[1])
        self.model = load_model(ckpt)
        self.tok = Tokenizer.load(ckpt)
        self.client = openai.OpenAI(base_url=url + "/v1", api_key=api_key or "unused", max_retries=0, timeout=60)

    def expected_completion(self, prompt: str, n: int, **kw):
        return complete(self.model, self.tok, [prompt], SamplingParams(max_new_tokens=n, **{**GREEDY, **kw}))[0]

    def chat_ids(self, messages: list[dict]) -> list[int]:
        return self.tok.encode(render_messages(self.tok, messages))

    def expected_chat(self, messages: list[dict], n: int, **kw):
        ids = self.chat_ids(messages)
        return complete_ids(self.model, self.tok, [ids], SamplingParams(max_new_tokens=n, **{**GREEDY, **kw}))[0]

    @torch.no_grad()
    def model_tokens(self, ids: list[int], n: int) -> list[int]:
        """Up to n greedy tokens by plain forward passes (no cache), a final stop id included."""
        out: list[int] = []
        stop = {self.tok.eot_id, self.tok.im_end_id}
        while len(out) < n and (not out or out[-1] not in stop):
            out.append(int(self.model(torch.tensor([ids + out]))[0, -1, :self.tok.vocab_size].argmax()))
        return out

    def raw(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()


def start_server(ckpt: Path, *flags: str, env: dict | None = None, api_key: str | None = None):
    """Start `lmforge serve` on a free port; return (url, process) once it prints its address."""
    cmd = [sys.executable, "-m", "lmforge", "serve", str(ckpt), "--port", "0", "--max-body-bytes", "20000",
           "--max-tokens", "64", "--device", "cpu", *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})})
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    url, log, deadline = None, [], time.monotonic() + 90
    while url is None and time.monotonic() < deadline and proc.poll() is None:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        log.append(line)
        m = re.search(r"(http://127\.0\.0\.1:\d+)/", line)
        url = m.group(1) if m else None
    if url is None:
        proc.kill()
        pytest.fail("server did not start:\n" + "".join(log))
    return Served(url, ckpt, proc, api_key)


def stop_server(served: Served) -> None:
    served.proc.terminate()
    try:
        served.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        served.proc.kill()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    ckpt, _, _ = make_checkpoint(root, seed=1)
    s = start_server(ckpt)
    yield s
    stop_server(s)


def test_models_and_completions(served):
    models = served.client.models.list()
    assert [m.id for m in models.data] == ["ckpt"]
    r = served.client.completions.create(model="ckpt", prompt="Hello world", max_tokens=10, temperature=0)
    want = served.expected_completion("Hello world", 10)
    assert r.choices[0].text == want.text
    assert r.choices[0].finish_reason == want.finish_reason
    assert r.usage.prompt_tokens == len(served.tok.encode("Hello world"))
    assert r.usage.completion_tokens == want.completion_tokens
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_completion_and_stream_agree(served):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "你好, how are you?"}]
    r = served.client.chat.completions.create(model="ckpt", messages=messages, max_tokens=12, temperature=0)
    want = served.expected_chat(messages, 12)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want.text
    assert r.usage.prompt_tokens == want.prompt_tokens
    chunks = list(served.client.chat.completions.create(model="ckpt", messages=messages, max_tokens=12,
                                                        temperature=0, stream=True,
                                                        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == want.finish_reason
    assert chunks[-1].usage.completion_tokens == want.completion_tokens and chunks[-1].choices == []


def test_completion_stream_stop_seed_and_n(served):
    stream = served.client.completions.create(model="ckpt", prompt="def add", max_tokens=15, temperature=0, stream=True)
    text = "".join(c.choices[0].text for c in stream)
    want = served.expected_completion("def add", 15)
    assert text == want.text
    stop = want.text[3:6]
    r = served.client.completions.create(model="ckpt", prompt="def add", max_tokens=15, temperature=0, stop=[stop])
    assert r.choices[0].text == want.text[: want.text.find(stop)] and r.choices[0].finish_reason == "stop"
    kw = dict(model="ckpt", prompt="Hello", max_tokens=10, temperature=1.0, seed=42, n=2)
    a, b = served.client.completions.create(**kw), served.client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len(a.choices) == 2 and a.usage.prompt_tokens == len(served.tok.encode("Hello"))


def test_concurrent_requests_do_not_mix(served):
    prompts = ["The quick", "def add(a, b):", "机器学习", "Hello world!", "user assistant", "print("]
    sequential = [served.client.completions.create(model="ckpt", prompt=p, max_tokens=12, temperature=0)
                  .choices[0].text for p in prompts]

    def one(i: int) -> str:
        p = prompts[i % len(prompts)]
        if i % 2:  # mix streaming and plain requests
            s = served.client.completions.create(model="ckpt", prompt=p, max_tokens=12, temperature=0, stream=True)
            return "".join(c.choices[0].text for c in s)
        return served.client.completions.create(model="ckpt", prompt=p, max_tokens=12, temperature=0).choices[0].text

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(one, range(12)))
    assert results == [sequential[i % len(prompts)] for i in range(12)]


def _error(status_body) -> tuple[int, dict]:
    status, body = status_body
    return status, json.loads(body)["error"]


def test_bad_requests_get_openai_shaped_4xx(served):
    post = lambda path, body, **h: served.raw("POST", path, body, {"Content-Type": "application/json", **h})
    status, err = _error(post("/v1/chat/completions", b"{not json"))
    assert status == 400 and "not valid JSON" in err["message"] and err["type"] == "invalid_request_error"
    status, err = _error(post("/v1/completions", json.dumps({"prompt": "x" * 30000}).encode()))
    assert status == 413 and err["code"] == "request_too_large"
    status, err = _error(post("/v1/completions", json.dumps({"prompt": "hello " * 400}).encode()))
    assert status == 400 and err["code"] == "context_length_exceeded"
    status, err = _error(post("/v1/chat/completions", json.dumps({"model": "ckpt"}).encode()))
    assert status == 400 and err["param"] == "messages"
    status, err = _error(post("/v1/chat/completions", json.dumps(
        {"messages": [{"role": "robot", "content": "hi"}]}).encode()))
    assert status == 400 and "role" in err["message"]
    for bad, param in (({"temperature": 5}, "temperature"), ({"max_tokens": 0}, "max_tokens"),
                       ({"max_tokens": 10_000}, "max_tokens"), ({"presence_penalty": 1}, "presence_penalty"),
                       ({"stream": "yes"}, "stream"), ({"n": 99}, "n")):
        status, err = _error(post("/v1/completions", json.dumps({"prompt": "hi", **bad}).encode()))
        assert status == 400 and err["param"] == param, bad
    status, err = _error(post("/v1/completions", b"[1, 2]"))
    assert status == 400
    status, err = _error(served.raw("GET", "/v1/nothing"))
    assert status == 404
    with pytest.raises(openai.BadRequestError):
        served.client.completions.create(model="ckpt", prompt="hi", max_tokens=5, temperature=3.0)
    # the server is still healthy afterwards
    assert served.raw("GET", "/health")[0] == 200


def test_web_page_is_self_contained(served):
    status, body = served.raw("GET", "/")
    html = body.decode()
    assert status == 200 and "<textarea" in html and "/v1/chat/completions" in html
    assert "<script src" not in html and "https://" not in html and "http://" not in html  # no CDN


def test_unknown_model_gets_404_model_not_found(served):
    for call in (lambda: served.client.completions.create(model="gpt-4o", prompt="hi", max_tokens=2),
                 lambda: served.client.chat.completions.create(
                     model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=2),
                 lambda: served.client.models.retrieve("gpt-4o")):
        with pytest.raises(openai.NotFoundError) as e:
            call()
        assert e.value.status_code == 404 and e.value.code == "model_not_found"
        err = e.value.body  # the client hands over the inner "error" object
        assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
        assert err["param"] is None and "`gpt-4o`" in err["message"] and "`ckpt`" in err["message"]
    # no model at all, and the served name, are both fine
    status, body = served.raw("POST", "/v1/completions", json.dumps({"prompt": "hi", "max_tokens": 2}).encode(),
                              {"Content-Type": "application/json"})
    assert status == 200 and json.loads(body)["model"] == "ckpt"
    assert served.client.models.retrieve("ckpt").id == "ckpt"


def test_a_burst_of_connections_is_accepted_at_once(served):
    """With listen(5), connections past the backlog have their SYN dropped and retry a second later."""
    socks = [socket.socket() for _ in range(48)]
    try:
        for s in socks:
            s.setblocking(False)
        start = time.monotonic()
        for s in socks:  # all SYNs in flight together, as from many clients at once
            s.connect_ex((served.host, served.port))
        pending, connected = set(socks), {}
        while pending and time.monotonic() - start < 5:
            _, writable, _ = select.select([], list(pending), [], 0.05)
            for s in writable:
                assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
                connected[s] = time.monotonic() - start
                pending.discard(s)
        assert not pending and max(connected.values()) < 0.5, sorted(connected.values())[-5:]
        # and they are real connections: each gets an answer
        for s in socks[:8]:
            s.setblocking(True)
            s.settimeout(30)
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.1 200")
    finally:
        for s in socks:
            s.close()


# --- a server that needs a key, with two waiting slots and a short body timeout ----------------

KEY = "sk-lmforge-test-0123456789"


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    root = tmp_path_factory.mktemp("guarded")
    ckpt, _, _ = make_checkpoint(root, seed=2)
    s = start_server(ckpt, "--max-waiting", "2", "--read-timeout", "4", env={"LMFORGE_API_KEY": KEY}, api_key=KEY)
    yield s
    stop_server(s)


def _headers(response: http.client.HTTPResponse) -> dict:
    return {k.lower(): v for k, v in response.getheaders()}


def test_api_key_is_required_on_v1_only(guarded):
    body = json.dumps({"prompt": "Hello", "max_tokens": 3, "temperature": 0}).encode()

    def post(headers: dict):
        conn = http.client.HTTPConnection(guarded.host, guarded.port, timeout=30)
        try:
            conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json", **headers})
            r = conn.getresponse()
            return r.status, _headers(r), json.loads(r.read())
        finally:
            conn.close()

    status, headers, err = post({})
    assert status == 401 and headers["www-authenticate"].startswith("Bearer")
    assert set(err["error"]) == {"message", "type", "param", "code"} and err["error"]["type"] == "invalid_request_error"
    assert "API key" in err["error"]["message"]
    for wrong in ("Bearer nope", f"Bearer {KEY}x", f"Basic {KEY}", KEY, f"Bearer {KEY[:-1]}"):
        status, _, err = post({"Authorization": wrong})
        assert status == 401, wrong
    status, _, err = post({"Authorization": "Bearer nope"})
    assert err["error"]["code"] == "invalid_api_key"
    status, _, ok = post({"Authorization": f"bearer {KEY}"})  # the scheme is case-insensitive
    assert status == 200 and ok["choices"][0]["text"] == guarded.expected_completion("Hello", 3).text
    assert guarded.raw("GET", "/v1/models")[0] == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=guarded.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert [m.id for m in guarded.client.models.list().data] == ["ckpt"]
    # the page and the health check stay open: the page asks for the key itself
    status, page = guarded.raw("GET", "/")
    assert status == 200 and b'id="api-key"' in page
    assert guarded.raw("GET", "/health")[0] == 200


def test_api_key_flag_and_environment():
    from lmforge.errors import LmforgeError
    from lmforge.infer.server import api_key_from

    assert api_key_from(None, {}) is None
    assert api_key_from(None, {"LMFORGE_API_KEY": ""}) is None
    assert api_key_from(None, {"LMFORGE_API_KEY": " k1 "}) == "k1"
    assert api_key_from("k2", {"LMFORGE_API_KEY": "k1"}) == "k2"
    with pytest.raises(LmforgeError, match="--api-key is empty"):
        api_key_from("  ", {})


def test_stalled_clients_hold_no_waiting_slot(guarded):
    """Three clients send headers and part of a body, then stall; the server has two waiting slots.
    A normal request must still be served, and the stalled ones get 408 after the read timeout."""
    stalled = []
    try:
        for _ in range(3):
            s = socket.create_connection((guarded.host, guarded.port), timeout=30)
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 100\r\n\r\n{\"prompt\": ")
            stalled.append(s)
        time.sleep(0.5)  # the server is now waiting on their bodies
        # Served, not 429: had the stalled clients taken both waiting slots, this would be refused.
        r = guarded.client.completions.create(model="ckpt", prompt="Hello", max_tokens=3, temperature=0)
        assert r.choices[0].text == guarded.expected_completion("Hello", 3).text
        for s in stalled:
            answer = b""
            while chunk := s.recv(4096):  # headers and body may come in separate segments; the server closes
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
            assert b"request_timeout" in answer
    finally:
        for s in stalled:
            s.close()


# --- the web page in a real browser --------------------------------------------------------------

class Cdp:
    """Just enough of the Chrome DevTools Protocol: call a method, wait for its answer."""

    def __init__(self, ws_url: str):
        import websocket

        self.ws = websocket.create_connection(ws_url, timeout=30, suppress_origin=True)
        self.next_id = 0

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]
        raise TimeoutError(method)

    def eval(self, expression: str):
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(r["exceptionDetails"])
        return r["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.eval(expression)
            if value:
                return value
            time.sleep(0.2)
        raise TimeoutError(expression)


@pytest.fixture()
def browser(tmp_path):
    exe = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    if exe is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium)")
    import websocket  # noqa: F401  (a dev dependency: never skipped)
    log = tmp_path / "chromium.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                                 "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                                 f"--user-data-dir={tmp_path / 'profile'}", "--remote-debugging-port=0",
                                 "--remote-allow-origins=*", "about:blank"],
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline, port = time.monotonic() + 60, None
        while port is None and time.monotonic() < deadline and proc.poll() is None:
            m = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", log.read_text(errors="replace"))
            port = int(m.group(1)) if m else time.sleep(0.2)
        if port is None:
            pytest.fail("Chromium did not start:\n" + log.read_text(errors="replace")[-2000:])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            pages = [t for t in json.load(r) if t["type"] == "page"]
        cdp = Cdp(pages[0]["webSocketDebuggerUrl"])
        yield cdp
        cdp.ws.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def chat_in_browser(browser, served: Served) -> None:
    """Send one message from the page and check the streamed reply against the engine's."""
    browser.eval("""
        window.__states = [];
        new MutationObserver(() => {
          const a = document.querySelectorAll('.assistant');
          const t = a.length ? a[a.length - 1].textContent : '';
          if (t && window.__states[window.__states.length - 1] !== t) window.__states.push(t);
        }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
        document.getElementById('temperature').value = '0';
        document.getElementById('max-tokens').value = '40';
        document.getElementById('input').value = 'Hello there';
        document.getElementById('send').click();
        true""")
    browser.wait_for("(() => { const a = document.querySelector('.assistant');"
                     " return a && a.dataset.done === 'true'; })()")
    assert browser.eval("document.querySelectorAll('.error').length") == 0
    final = browser.eval("document.querySelector('.assistant').textContent")
    states = browser.eval("window.__states")
    want = served.expected_chat([{"role": "user", "content": "Hello there"}], 40)
    assert final == want.text and final
    assert len(states) >= 2, states  # the reply grew in several steps: it was streamed
    assert all(final.startswith(s) for s in states)


def test_web_chat_streams_in_a_browser(served, browser):
    browser.call("Page.enable")
    browser.call("Page.navigate", url=served.url + "/")
    browser.wait_for("document.readyState === 'complete' && !!document.getElementById('send')"
                     " && document.getElementById('model').textContent.includes('ckpt')")
    assert browser.eval("document.getElementById('key-label').hidden") is True  # no key, no key field
    chat_in_browser(browser, served)


def test_web_chat_asks_for_the_api_key(guarded, browser):
    browser.call("Page.enable")
    browser.call("Page.navigate", url=guarded.url + "/")
    browser.wait_for("document.readyState === 'complete'"
                     " && document.getElementById('model').textContent.includes('needs an API key')")
    assert browser.eval("document.getElementById('key-label').hidden") is False
    browser.eval(f"""const k = document.getElementById('api-key'); k.value = '{KEY}';
                     k.dispatchEvent(new Event('change')); true""")
    browser.wait_for("document.getElementById('model').textContent.includes('ckpt')")
    chat_in_browser(browser, guarded)
