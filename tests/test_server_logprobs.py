"""Log-probabilities from `lmforge serve`: `echo` and `logprobs` on completions (what lm-eval's
`local-completions` model needs for log-likelihood tasks) and `logprobs` on chat, each held equal to
a plain forward pass of the model."""

from __future__ import annotations

import json

import openai
import pytest
import torch
from infer_helpers import make_checkpoint, one_thread  # noqa: F401 (fixture)
from test_server import start_server, stop_server

from lmforge.infer.engine import generate_samples
from lmforge.infer.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["The quick brown fox", "机器学习是人工智能", "def add(a, b):\n    return", "Hello"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("logprobs")
    ckpt, _, _ = make_checkpoint(root, seed=3)
    s = start_server(ckpt)
    yield s
    stop_server(s)


@torch.no_grad()
def forward_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(token | everything before it), row i predicting ids[i + 1]: the reference for every test."""
    return model(torch.tensor([ids]))[0].float().log_softmax(-1)


def post(served, path: str, body: dict) -> tuple[int, dict]:
    status, raw = served.raw("POST", path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    return status, json.loads(raw)


def test_engine_scores_prompts_and_new_tokens_like_a_forward_pass(tmp_path):
    ckpt, model, tok = make_checkpoint(tmp_path, seed=4)
    prompts = [tok.encode(p) for p in PROMPTS]  # different lengths: the batch is left-padded
    for new in (0, 3):
        params = SamplingParams(max_new_tokens=new, temperature=0.0, top_k=0, top_p=1.0)
        samples = generate_samples(model, prompts, params, top_logprobs=4, score_prompt=True,
                                   vocab_limit=tok.vocab_size)
        for ids, s in zip(prompts, samples):
            assert len(s.tokens) == new and len(s.scores) == new and len(s.prompt_scores) == len(ids)
            assert s.prompt_scores[0] is None
            whole = ids + s.tokens
            ref = forward_logprobs(model, whole)
            got = [sc for sc in s.prompt_scores[1:]] + s.scores
            for i, sc in enumerate(got, start=1):
                assert sc.token == whole[i]
                assert sc.logprob == pytest.approx(ref[i - 1, whole[i]].item(), abs=1e-4)
                top = ref[i - 1, :tok.vocab_size].topk(4)
                assert [t for t, _ in sc.top] == top.indices.tolist()
                assert [v for _, v in sc.top] == pytest.approx(top.values.tolist(), abs=1e-4)
            for sc in s.scores:  # greedy: every new token is the most likely one
                assert sc.top[0] == (sc.token, sc.logprob)


def test_echo_scores_the_prompt_only(served):
    prompt = "机器学习 is fun.\n\nprint(1)"
    r = served.client.completions.create(model="ckpt", prompt=prompt, echo=True, logprobs=5, max_tokens=0)
    c = r.choices[0]
    ids = served.tok.encode(prompt)
    ref = forward_logprobs(served.model, ids)
    assert c.text == prompt and c.finish_reason == "length"
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 0
    lp = c.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == len(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx([ref[i - 1, ids[i]].item() for i in range(1, len(ids))], abs=1e-4)
    assert all(len(top) == 5 for top in lp.top_logprobs[1:])
    for i in range(1, len(ids)):  # the alternatives are the five most likely tokens, best first
        best = ref[i - 1, :served.tok.vocab_size].topk(5).values.tolist()
        assert sorted(lp.top_logprobs[i].values(), reverse=True) == pytest.approx(best, abs=1e-4)
    # Tokens and offsets describe the text: byte-level pieces of a character show as bytes:\x..
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert any(t.startswith("bytes:\\x") for t in lp.tokens)  # the Chinese splits inside characters
    for token, at in zip(lp.tokens, lp.text_offset):
        if not token.startswith("bytes:"):
            assert c.text[at:at + len(token)] == token
    assert "".join(t for t in lp.tokens if not t.startswith("bytes:")) in prompt.replace("机器学习", "")


def test_logprobs_of_new_tokens_with_and_without_echo(served):
    prompt = "Hello world"
    ids = served.tok.encode(prompt)
    plain = served.client.completions.create(model="ckpt", prompt=prompt, max_tokens=6, temperature=0, logprobs=2)
    echoed = served.client.completions.create(model="ckpt", prompt=prompt, max_tokens=6, temperature=0, logprobs=2,
                                              echo=True)
    want = served.expected_completion(prompt, 6)
    assert plain.choices[0].text == want.text and echoed.choices[0].text == prompt + want.text
    new = served.model_tokens(ids, 6)
    ref = forward_logprobs(served.model, ids + new)
    expect = [ref[len(ids) + j - 1, t].item() for j, t in enumerate(new)]
    lp = plain.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx(expect, abs=1e-4)
    assert lp.text_offset[0] == 0  # offsets count in the returned text
    assert all(len(top) == 2 and max(top.values()) == lp.token_logprobs[j]  # greedy picks the best
               for j, top in enumerate(lp.top_logprobs))
    e = echoed.choices[0].logprobs
    assert e.token_logprobs[len(ids):] == lp.token_logprobs and len(e.tokens) == len(ids) + len(new)
    assert e.text_offset[len(ids)] == len(prompt)


def test_token_id_prompts_and_a_full_context(served):
    ids = served.tok.encode("def add(a, b):\n    return a + b\n" * 20)[:128]  # exactly the context
    assert len(ids) == 128
    status, r = post(served, "/v1/completions", {"prompt": ids, "echo": True, "logprobs": 0, "max_tokens": 0})
    assert status == 200
    lp = r["choices"][0]["logprobs"]
    assert r["choices"][0]["text"] == served.tok.decode(ids) and len(lp["tokens"]) == 128
    ref = forward_logprobs(served.model, ids)
    assert lp["token_logprobs"][1:] == pytest.approx([ref[i - 1, ids[i]].item() for i in range(1, 128)], abs=1e-4)
    assert lp["top_logprobs"][1:] == [{}] * 127  # logprobs: 0 -> no alternatives
    status, err = post(served, "/v1/completions", {"prompt": ids, "echo": True, "logprobs": 0, "max_tokens": 1})
    assert status == 400 and err["error"]["code"] == "context_length_exceeded"


def test_chat_logprobs(served):
    messages = [{"role": "user", "content": "你好, how are you?"}]
    r = served.client.chat.completions.create(model="ckpt", messages=messages, max_tokens=8, temperature=0,
                                              logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert b"".join(bytes(t.bytes) for t in content).decode("utf-8", "replace") == r.choices[0].message.content
    want = served.expected_chat(messages, 8)
    assert r.choices[0].message.content == want.text
    prompt = served.chat_ids(messages)
    new = served.model_tokens(prompt, len(content))
    ref = forward_logprobs(served.model, prompt + new)
    assert [t.logprob for t in content] == pytest.approx(
        [ref[len(prompt) + j - 1, t].item() for j, t in enumerate(new)], abs=1e-4)
    assert all(len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob == t.logprob for t in content)
    plain = served.client.chat.completions.create(model="ckpt", messages=messages, max_tokens=3)
    assert plain.choices[0].logprobs is None


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "hi", "logprobs": 6}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "logprobs": True}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 1, "stream": True}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "echo": "yes"}, "echo"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True,
                              "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "echo": True}, "echo"),
])
def test_bad_logprob_requests_name_the_field(served, path, body, param):
    status, err = post(served, path, body)
    assert status == 400 and err["error"]["param"] == param, err


def test_echo_streams_the_prompt_first(served):
    chunks = list(served.client.completions.create(model="ckpt", prompt="Hello", max_tokens=5, temperature=0,
                                                   echo=True, stream=True))
    assert chunks[0].choices[0].text == "Hello"
    assert "".join(c.choices[0].text for c in chunks) == "Hello" + served.expected_completion("Hello", 5).text


def test_lm_eval_local_completions_loglikelihood(served):
    """lm-eval's own client, pointed at the server, scores (context, continuation) pairs as the model does."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    lm = LocalCompletionsAPI(model="ckpt", base_url=served.url + "/v1/completions", tokenizer=str(served.ckpt),
                             tokenizer_backend="huggingface", max_length=128, max_retries=1, timeout=60)
    pairs = [("The quick brown", " fox"), ("机器学习是", "人工智能的一个分支。"),
             ("def add(a, b):", "\n    return a + b"), ("Question: 2 + 2 =", " 4")]
    for context in ("The quick brown", "Hello world", "def add(a, b):"):  # a pair the model would say itself
        ids = served.tok.encode(context)
        new = served.model_tokens(ids, 2)
        if served.tok.encode(context + served.tok.decode(new)) == ids + new:  # text that round-trips
            pairs.append((context, served.tok.decode(new)))
            break
    assert len(pairs) == 5
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    got = lm.loglikelihood(requests, disable_tqdm=True)
    for (context, continuation), (logprob, is_greedy) in zip(pairs, got):
        # lm-eval's split: the context's own ids, then the whole text's ids past that many tokens
        # (where BPE merges across the boundary, as in the Chinese pair, the two differ).
        context_ids = served.tok.encode(context)
        ids = context_ids + served.tok.encode(context + continuation)[len(context_ids):]
        ref = forward_logprobs(served.model, ids)
        rows = [ref[i - 1] for i in range(len(context_ids), len(ids))]
        assert logprob == pytest.approx(sum(r[t].item() for r, t in zip(rows, ids[len(context_ids):])), abs=1e-4)
        best = [int(r[:served.tok.vocab_size].argmax()) for r in rows]
        assert is_greedy == (best == ids[len(context_ids):]), (context, continuation)
    assert got[-1][1] is True  # the model's own greedy continuation is recognised as greedy
    with pytest.raises(openai.NotFoundError):  # and a wrong model name is not silently answered
        served.client.completions.create(model="other", prompt="x", echo=True, logprobs=1, max_tokens=0)
