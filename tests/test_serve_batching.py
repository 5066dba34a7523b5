"""Continuous batching (infer/batching.py): every request gets what it gets alone, whatever joins or
leaves the batch around it; the queue and the cache cap are bounded; a client that leaves is dropped."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest
import torch
from infer_helpers import make_model, make_tokenizer, one_thread  # noqa: F401 (fixture)

from lmforge.config import MoEConfig
from lmforge.errors import LmforgeError
from lmforge.infer.batching import Busy, Job, Scheduler
from lmforge.infer.engine import complete_ids, encode_prompt
from lmforge.infer.sampling import SamplingParams
from lmforge.infer.server import ModelService, Server

pytestmark = pytest.mark.usefixtures("one_thread")

GREEDY = dict(temperature=0.0, top_k=0, top_p=1.0)
FAMILIES = {
    "dense": dict(),
    "mla": dict(attention="mla", n_kv_head=0, kv_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=16,
                v_head_dim=16),
    "moe": dict(moe=MoEConfig(experts=4, top_k=2)),
    "gpt2": dict(arch="gpt2", n_kv_head=0),  # learned positions: each row's own, not the cache column
}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def wait(job: Job, timeout: float = 60.0) -> tuple[list, list]:
    """(completions, streamed (choice, delta) events) of a submitted job."""
    texts = []
    while True:
        kind, *rest = job.events.get(timeout=timeout)
        if kind == "text":
            texts.append(tuple(rest))
        elif kind == "error":
            raise rest[0]
        else:
            return rest[0], texts


def requests(tok) -> list[tuple[list[list[int]], SamplingParams, dict]]:
    """Prompts of different lengths and budgets; greedy, seeded sampling, stop strings, n > 1, logprobs."""
    enc = tok.encode
    return [
        ([enc("The quick brown fox")], SamplingParams(max_new_tokens=20, **GREEDY), {}),
        ([enc("def add(a, b):\n    return")], SamplingParams(max_new_tokens=7, **GREEDY), {}),
        ([enc("Hi")], SamplingParams(max_new_tokens=30, **GREEDY), dict(top_logprobs=2)),
        ([enc("机器学习是")] * 2, SamplingParams(max_new_tokens=12, temperature=0.9, top_k=20, top_p=0.9, seed=7), {}),
        ([enc("Hello world! Language models"), enc("user")], SamplingParams(max_new_tokens=9, **GREEDY),
         dict(top_logprobs=1, score_prompt=True)),
        ([enc("print(add(1, 2))")], SamplingParams(max_new_tokens=25, temperature=1.0, seed=3,
                                                   repetition_penalty=1.3), {}),
        ([enc("The lazy dog")], SamplingParams(max_new_tokens=40, stop=["o"], **GREEDY), {}),
    ]


def alone(model, tok, prompts, params, kw):
    texts = []
    out = complete_ids(model, tok, prompts, params, on_text=lambda row, t: texts.append((row, t)), **kw)
    return out, texts


def key(c) -> tuple:
    """Everything but the log-probabilities' values, which may differ by float rounding."""
    scores = [(s.token, [i for i, _ in s.top]) for s in c.scores or []]
    prompt = [None if s is None else s.token for s in c.prompt_scores or []]
    return c.text, c.tokens, c.finish_reason, c.prompt_tokens, c.completion_tokens, scores, prompt


def logprobs(c) -> list[float]:
    return [v for s in [*(c.prompt_scores or []), *(c.scores or [])] if s is not None
            for v in [s.logprob, *(v for _, v in s.top)]]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_concurrent_requests_equal_their_solo_outputs(tok, family):
    model = make_model(tok.vocab_size, seed=3, **FAMILIES[family])
    sched = Scheduler(model, tok, max_batch=8, max_waiting=16, max_cached_tokens=4096)
    assert sched.batched
    reqs = requests(tok)
    want = [alone(model, tok, p, s, kw) for p, s, kw in reqs]
    # Submitted before the scheduler starts, then more while it runs: rows join a running batch.
    jobs = [sched.submit(Job(p, s, **kw, stream=True)) for p, s, kw in reqs[:3]]
    sched.start()
    jobs += [sched.submit(Job(p, s, **kw, stream=True)) for p, s, kw in reqs[3:]]
    got = [wait(j) for j in jobs]
    for (w_out, w_text), (g_out, g_text) in zip(want, got):
        assert [key(c) for c in g_out] == [key(c) for c in w_out]
        for g, w in zip(g_out, w_out):
            assert logprobs(g) == pytest.approx(logprobs(w), abs=1e-4)
        assert g_text == w_text  # the same stream of deltas
    wait_until(lambda: sched.stats()["running_rows"] == 0)  # the last rows leave just after their answer
    assert sched.peak_cached > 0


def test_joins_while_running_and_the_cache_stays_capped(tok):
    """Staggered arrivals join a batch mid-flight; the batch cache never exceeds the cap."""
    model = make_model(tok.vocab_size, seed=4)
    cap = 6 * 128
    sched = Scheduler(model, tok, max_batch=4, max_waiting=32, max_cached_tokens=cap).start()
    prompts = [tok.encode("The quick brown fox " * (1 + i % 3)) for i in range(10)]
    params = [SamplingParams(max_new_tokens=5 + 7 * (i % 4), **GREEDY) for i in range(10)]
    want = [complete_ids(model, tok, [p], s)[0].tokens for p, s in zip(prompts, params)]
    jobs = []
    for p, s in zip(prompts, params):
        jobs.append(sched.submit(Job([p], s)))
        wait_until(lambda: sched.stats()["running_rows"] > 0 or jobs[-1].events.qsize() > 0)
    assert [wait(j)[0][0].tokens for j in jobs] == want
    assert 0 < sched.peak_cached <= cap


def wait_until(cond, timeout: float = 30.0) -> None:
    done = threading.Event()
    for _ in range(int(timeout / 0.005)):
        if cond():
            return
        done.wait(0.005)
    raise TimeoutError


def test_queue_limit_and_cache_cap(tok):
    model = make_model(tok.vocab_size, seed=5)
    sched = Scheduler(model, tok, max_batch=4, max_waiting=2, max_cached_tokens=256)  # not started: nothing runs
    p = SamplingParams(max_new_tokens=8, **GREEDY)
    sched.submit(Job([[5, 6]], p))
    sched.submit(Job([[5, 6]], p))
    with pytest.raises(Busy) as e:
        sched.submit(Job([[5, 6]], p))
    assert e.value.retry_after >= 1
    with pytest.raises(LmforgeError, match="max_cached_tokens"):  # could never fit, however long it waited
        sched.submit(Job([[5] * 100] * 3, SamplingParams(max_new_tokens=100, **GREEDY)))
    with pytest.raises(LmforgeError, match="max_cached_tokens"):
        Scheduler(model, tok, max_cached_tokens=64)  # below the context: refused at start-up


def test_a_cancelled_job_leaves_the_batch(tok):
    model = make_model(tok.vocab_size, seed=6)
    sched = Scheduler(model, tok, max_batch=4, max_waiting=8, max_cached_tokens=4096)
    hook = model.register_forward_pre_hook(lambda m, a: time.sleep(0.01))  # 10 ms a step
    long = sched.submit(Job([tok.encode("Hello")], SamplingParams(max_new_tokens=120, **GREEDY)))
    short = sched.submit(Job([tok.encode("The quick")], SamplingParams(max_new_tokens=6, **GREEDY)))
    sched.start()
    out, _ = wait(short)
    assert out[0].tokens == complete_ids(model, tok, [tok.encode("The quick")], short.params)[0].tokens
    assert sched.stats()["running_rows"] == 1  # the long one runs on, about 1 s more
    long.cancel()
    wait_until(lambda: sched.stats()["running_rows"] == 0, timeout=0.5)
    hook.remove()
    events = []
    while not long.events.empty():
        events.append(long.events.get())
    assert not [e for e in events if e[0] == "done" and len(e[1][0].tokens) == 120]


def test_sliding_window_runs_one_request_at_a_time(tok):
    model = make_model(tok.vocab_size, seed=7, sliding_window=8)
    sched = Scheduler(model, tok, max_batch=8).start()
    assert not sched.batched and "sliding_window" in sched.refusal
    params = SamplingParams(max_new_tokens=20, **GREEDY)
    jobs = [sched.submit(Job([tok.encode(t)], params)) for t in ("Hello", "def add(a, b):")]
    for job, t in zip(jobs, ("Hello", "def add(a, b):")):
        assert wait(job)[0][0].tokens == complete_ids(model, tok, [tok.encode(t)], params)[0].tokens
    assert not Scheduler(make_model(tok.vocab_size), tok, max_batch=1).batched  # the one-at-a-time switch


@torch.inference_mode()
def test_rebuilt_cache_matches_a_fresh_prefill(tok):
    """After joins and departures, the next logits of every row equal its own uncached forward pass."""
    model = make_model(tok.vocab_size, seed=8)
    sched = Scheduler(model, tok, max_batch=4, max_waiting=8, max_cached_tokens=4096)
    jobs = [Job([tok.encode("The quick brown fox jumps")], SamplingParams(max_new_tokens=3, **GREEDY)),
            Job([tok.encode("Hi")], SamplingParams(max_new_tokens=30, **GREEDY)),
            Job([tok.encode("def add(a, b):")], SamplingParams(max_new_tokens=30, **GREEDY))]
    sched.submit(jobs[0])
    sched.submit(jobs[1])
    for _ in range(5):
        sched._step()  # the first job ends; the second runs on
    sched.submit(jobs[2])
    sched._step()  # the third joins left-padded next to the second
    rows = list(sched.rows)
    assert len(rows) == 2 and sched.cache.key_mask[:, :sched.cache.length].sum(1).tolist() != [sched.cache.length] * 2
    step = model(torch.tensor([[r.last] for r in rows]), positions=torch.tensor([[r.used] for r in rows]),
                 cache=sched.cache)[:, -1]
    for i, row in enumerate(rows):
        ids = sched.owner[id(row)].job.prompts[row.choice] + row.sample.tokens
        torch.testing.assert_close(step[i], model(torch.tensor([ids]))[0, -1], rtol=1e-4, atol=1e-4)


# --- through the HTTP server, in this process -------------------------------------------------------

@pytest.fixture(params=[4, 1], ids=["batched", "one-at-a-time"])
def server(tok, request):
    """A served tiny model whose every forward first passes `gate` (open unless a test closes it);
    batched, and one request at a time (--max-batch 1)."""
    model = make_model(tok.vocab_size, seed=9)
    gate = threading.Event()
    gate.set()
    entered = threading.Event()

    def hook(m, args):
        entered.set()
        gate.wait()
        time.sleep(0.01)  # 10 ms a step: a long request takes long enough to be left mid-way

    model.register_forward_pre_hook(hook)
    service = ModelService(model, tok, "m", max_tokens=120, max_waiting=1, max_batch=request.param,
                           max_cached_tokens=512)
    srv = Server(("127.0.0.1", 0), service, max_body=20000)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield srv, model, gate, entered
    gate.set()
    srv.shutdown()
    srv.server_close()


def post(srv, body: dict) -> tuple[int, dict, dict]:
    conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=60)
    try:
        conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), json.loads(r.read())
    finally:
        conn.close()


def test_a_full_queue_answers_429_with_retry_after(server, tok):
    srv, model, gate, entered = server
    sched = srv.service.scheduler
    gate.clear()
    entered.clear()
    answers = {}
    body = dict(prompt="Hello", max_tokens=6, temperature=0)
    first = threading.Thread(target=lambda: answers.update(a=post(srv, body)))
    first.start()
    assert entered.wait(30)  # the first request is in the model, held at the gate
    second = threading.Thread(target=lambda: answers.update(b=post(srv, body)))
    second.start()
    wait_until(lambda: sched.stats()["waiting"] == 1)  # the second one waits: the queue (max_waiting=1) is full
    status, headers, err = post(srv, body)
    assert status == 429 and err["error"]["code"] == "server_busy"
    assert int(headers["Retry-After"]) >= 1
    gate.set()
    first.join(30)
    second.join(30)
    want = complete_ids(model, tok, [encode_prompt(tok, "Hello")], SamplingParams(max_new_tokens=6, **GREEDY))[0]
    assert [answers[k][0] for k in "ab"] == [200, 200]
    assert [answers[k][2]["choices"][0]["text"] for k in "ab"] == [want.text] * 2
    too_big = post(srv, dict(prompt=[5] * 100, max_tokens=28, n=8, temperature=0))  # 8 x 128 > the cap of 512
    assert too_big[0] == 400 and too_big[2]["error"]["code"] == "request_too_large"


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_is_dropped_from_the_batch(server, stream):
    srv, *_ = server
    sched = srv.service.scheduler
    body = json.dumps(dict(prompt="Hello", max_tokens=120, temperature=0, stream=stream)).encode()
    s = socket.create_connection(srv.server_address[:2], timeout=30)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    if stream:
        assert s.recv(4096).startswith(b"HTTP/1.1 200")  # headers, then the first events
    else:
        wait_until(lambda: sched.stats()["running_rows"] == 1)
    s.close()  # 120 tokens take at least 1.2 s; the row must leave long before
    start = time.monotonic()
    wait_until(lambda: sched.stats()["running_rows"] == 0, timeout=2)
    assert time.monotonic() - start < 0.6


def test_flags_win_over_serve_keys_and_bad_values_name_both():
    from argparse import Namespace

    from lmforge.config import ServeConfig
    from lmforge.infer.server import batch_settings

    keys = ServeConfig(max_batch=4, max_waiting=9, max_cached_tokens=1000)
    none = Namespace(max_batch=None, max_waiting=None, max_cached_tokens=None)
    assert batch_settings(none, keys) == (4, 9, 1000)
    assert batch_settings(Namespace(max_batch=1, max_waiting=None, max_cached_tokens=0), keys) == (1, 9, 0)
    with pytest.raises(LmforgeError, match=r"--max-batch \(serve.max_batch\) must be at least 1"):
        batch_settings(none, ServeConfig(max_batch=0))
