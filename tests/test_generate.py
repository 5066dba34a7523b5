"""The generation engine: cache == full recompute, batching == alone, sampling, stops, streaming."""

from __future__ import annotations

import pytest
import torch
from infer_helpers import make_model, make_tokenizer, one_thread  # noqa: F401 (fixture)

from lmforge.errors import LmforgeError
from lmforge.infer.engine import (
    TextStream,
    complete,
    generate,
    generate_ids,
    generate_ids_with_logprobs,
    generate_samples,
)
from lmforge.infer.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    filter_top_k,
    filter_top_p,
    sample_categorical,
)

pytestmark = pytest.mark.usefixtures("one_thread")

GREEDY = dict(temperature=0.0, top_k=0, top_p=1.0)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def full_recompute(model, prompt: list[int], n: int, penalty: float = 1.0) -> list[int]:
    """Greedy decoding the slow way: the whole sequence through the model at every step, no cache."""
    ids = list(prompt)
    out = []
    for _ in range(n):
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0, -1]
        if penalty != 1.0:
            seen = torch.zeros_like(logits, dtype=torch.bool)
            seen[torch.tensor(ids)] = True
            logits = apply_repetition_penalty(logits, seen, penalty)
        nxt = int(logits.argmax())
        ids.append(nxt)
        out.append(nxt)
    return out


VARIANTS = [dict(), dict(qk_norm=True, n_kv_head=4), dict(n_kv_head=1, tie_embeddings=False)]
PROMPTS = [[5, 17, 42], [7, 8, 9, 10, 11, 12, 13, 14, 15], [3], [20 + i for i in range(15)]]


@pytest.mark.parametrize("variant", VARIANTS, ids=["gqa", "qknorm-mha", "mqa-untied"])
def test_cached_greedy_equals_full_recompute(variant):
    model = make_model(300, **variant)
    params = SamplingParams(max_new_tokens=12, **GREEDY)
    (single,) = generate_ids(model, [PROMPTS[1]], params)
    assert single == full_recompute(model, PROMPTS[1], 12)
    batched = generate_ids(model, PROMPTS, params)
    for prompt, got in zip(PROMPTS, batched):
        assert got == generate_ids(model, [prompt], params)[0]  # batched == alone
        assert got == full_recompute(model, prompt, 12)


def test_repetition_penalty_in_left_padded_batch():
    model = make_model(300)
    params = SamplingParams(max_new_tokens=10, repetition_penalty=1.5, **GREEDY)
    batched = generate_ids(model, PROMPTS, params)
    for prompt, got in zip(PROMPTS, batched):
        assert got == full_recompute(model, prompt, 10, penalty=1.5)
    plain = generate_ids(model, PROMPTS, SamplingParams(max_new_tokens=10, **GREEDY))
    assert plain != batched  # the penalty changed something


def test_seeded_sampling_is_deterministic():
    model = make_model(300)
    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_k=0, top_p=1.0, seed=123)
    a = generate_ids(model, PROMPTS, params)
    b = generate_ids(model, PROMPTS, params)
    c = generate_ids(model, PROMPTS, SamplingParams(**{**params.__dict__, "seed": 124}))
    assert a == b
    assert a != c
    gen = torch.Generator().manual_seed(7)
    d = generate_ids(model, PROMPTS, SamplingParams(max_new_tokens=16, temperature=1.0), generator=gen)
    e = generate_ids(model, PROMPTS, SamplingParams(max_new_tokens=16, temperature=1.0),
                     generator=torch.Generator().manual_seed(7))
    assert d == e


def test_top_k_1_sampling_is_greedy():
    model = make_model(300)
    sampled = generate_ids(model, PROMPTS, SamplingParams(max_new_tokens=8, temperature=1.3, top_k=1, seed=1))
    assert sampled == generate_ids(model, PROMPTS, SamplingParams(max_new_tokens=8, **GREEDY))


def test_logits_processing_on_known_values():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0, 0.0]])
    assert torch.isinf(filter_top_k(logits, 2)).tolist() == [[True, False, False, True, True]]
    assert torch.equal(filter_top_k(logits, 0), logits)
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = lambda p: (~torch.isinf(filter_top_p(probs.log(), p))).tolist()[0]
    assert kept(0.7) == [True, True, False, False]
    assert kept(0.8) == [True, True, False, False]  # 0.5 + 0.3 reaches 0.8
    assert kept(0.81) == [True, True, True, False]
    assert kept(0.1) == [True, False, False, False]  # never empty
    assert kept(1.0) == [True, True, True, True]
    shuffled = torch.tensor([[0.15, 0.5, 0.05, 0.3]]).log()  # order must not matter
    assert (~torch.isinf(filter_top_p(shuffled, 0.7))).tolist()[0] == [False, True, False, True]
    pen = apply_repetition_penalty(torch.tensor([[2.0, -2.0, 1.0]]), torch.tensor([[True, True, False]]), 2.0)
    assert pen.tolist() == [[1.0, -4.0, 1.0]]


def test_sampling_follows_the_distribution():
    """With top-k 2 on known logits, only the two best tokens appear, in about their ratio."""

    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.cfg = type("C", (), {"max_seq_len": 64, "vocab_size": 4})()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def new_cache(self, batch, max_len):
            return type("Cache", (), {"key_mask": torch.ones(batch, max_len, dtype=torch.bool),
                                      "has_padding": False, "select": lambda self, i: None})()

        def forward(self, ids, positions=None, cache=None, return_hidden=False):
            return torch.log(torch.tensor([0.6, 0.3, 0.08, 0.02])).expand(ids.shape[0], ids.shape[1], 4)

        def logits(self, hidden):  # the prefill asks for hidden states and reads the last position's logits
            return hidden

    params = SamplingParams(max_new_tokens=1, temperature=1.0, top_k=2, top_p=1.0, seed=0)
    out = generate_ids(Fixed(), [[0]] * 3000, params)
    counts = torch.bincount(torch.tensor([o[0] for o in out]), minlength=4)
    assert counts[2] == counts[3] == 0
    assert abs(counts[0] / 3000 - 2 / 3) < 0.04


def test_categorical_draws_follow_the_probabilities_and_never_a_zero(monkeypatch):
    probs = torch.tensor([0.0, 0.5, 0.0, 0.3, 0.2, 0.0])
    draws = sample_categorical(probs.expand(30000, 6), torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=6) / 30000
    assert counts[0] == counts[2] == counts[5] == 0
    assert torch.allclose(counts, probs, atol=0.015)
    # a uniform at the top of [0, 1) rounds onto the CDF's end: the last possible token, not padding past it
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.full((2, 1), 1 - 2 ** -24))
    edge = torch.tensor([[0.1, 0.9, 0.0, 0.0], [1e-8, 0.0, 0.0, 0.0]])
    assert sample_categorical(edge).tolist() == [1, 0]


def test_stop_ids_end_rows_and_finished_rows_stop_growing():
    model = make_model(300)
    params = SamplingParams(max_new_tokens=12, **GREEDY)
    free = generate_ids(model, PROMPTS, params)
    stop = free[0][3]
    calls: dict[int, int] = {}
    out = generate_samples(model, PROMPTS, params, stop_ids={stop},
                           on_token=lambda r, t: calls.__setitem__(r, calls.get(r, 0) + 1))
    first = free[0].index(stop)
    assert out[0].tokens == free[0][: first + 1] and out[0].finish_reason == "stop"
    assert calls[0] == first + 1  # no callbacks once the row finished
    for o, f in zip(out, free):
        cut = f.index(stop) + 1 if stop in f else len(f)
        assert o.tokens == f[:cut]
        assert o.finish_reason == ("stop" if stop in f else "length")


def test_callback_can_finish_a_row():
    model = make_model(300)
    out = generate_samples(model, PROMPTS, SamplingParams(max_new_tokens=10, **GREEDY),
                           on_token=lambda r, t: r == 1)
    assert len(out[1].tokens) == 1 and out[1].finish_reason == "stop"
    assert all(len(o.tokens) == 10 for i, o in enumerate(out) if i != 1)


def test_context_limits():
    model = make_model(300, max_seq_len=32)
    with pytest.raises(LmforgeError, match="leaves no room"):
        generate_ids(model, [list(range(32))], SamplingParams(max_new_tokens=1))
    with pytest.raises(LmforgeError, match="empty"):
        generate_ids(model, [[]], SamplingParams())
    out = generate_samples(model, [list(range(1, 29)), [1, 2]], SamplingParams(max_new_tokens=10, **GREEDY))
    assert len(out[0].tokens) == 4 and out[0].finish_reason == "length"  # truncated to fit the context
    assert len(out[1].tokens) == 10
    assert generate_ids(model, [[1, 2]], SamplingParams(max_new_tokens=0)) == [[]]


def test_logprobs_match_the_model():
    model = make_model(300)
    prompt = PROMPTS[0]
    for temperature in (0.0, 0.7):
        params = SamplingParams(max_new_tokens=6, temperature=temperature, top_k=0, top_p=1.0, seed=3)
        (toks,), (lps,) = generate_ids_with_logprobs(model, [prompt], params)
        with torch.no_grad():
            logits = model(torch.tensor([prompt + toks]))[0, len(prompt) - 1:-1]
        t = temperature or 1.0
        ref = (logits / t).log_softmax(-1).gather(1, torch.tensor(toks)[:, None]).squeeze(1)
        torch.testing.assert_close(torch.tensor(lps), ref, atol=1e-4, rtol=1e-4)


def test_stop_strings_cut_text(tok):
    model = make_model(tok.vocab_size)
    params = SamplingParams(max_new_tokens=30, **GREEDY)
    (full,) = complete(model, tok, ["Hello world"], params)
    text = full.text
    assert len(text) > 8
    stop = text[4:7]
    first = text.find(stop)
    streamed: list[str] = []
    (cut,) = complete(model, tok, ["Hello world"], SamplingParams(**{**params.__dict__, "stop": [stop]}),
                      on_text=lambda r, d: streamed.append(d))
    assert cut.text == text[:first]
    assert "".join(streamed) == cut.text
    assert cut.finish_reason == "stop" and cut.completion_tokens < full.completion_tokens
    assert generate(model, tok, ["Hello world"], params) == [text]


def byte_tokens(tok, text: str) -> list[int]:
    """One token per UTF-8 byte, the worst case for streaming multi-byte characters."""
    from tokenizers import pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    table = {b: c for b, c in zip(sorted(range(256)), _bytes_to_unicode())}
    assert set(table.values()) == set(alphabet)
    return [tok.token_id(table[b]) for b in text.encode("utf-8")]


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table, in byte order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def test_streaming_never_emits_half_characters(tok):
    stream = TextStream(tok, [], {tok.eot_id})
    deltas = [stream.push(t)[0] for t in byte_tokens(tok, "中文ok")]
    assert deltas == ["", "", "中", "", "", "文", "o", "k"]
    assert stream.finish() == ""
    stream = TextStream(tok, [], set())
    deltas = [stream.push(t)[0] for t in byte_tokens(tok, "a中")[:2]]
    assert deltas == ["a", ""]
    assert stream.finish() == "\ufffd"  # an unfinished character at the very end is flushed as U+FFFD


def test_streaming_holds_back_a_possible_stop_string(tok):
    stream = TextStream(tok, ["world"], set())
    out = [stream.push(t) for t in byte_tokens(tok, "hello wor")]
    assert "".join(d for d, _ in out) == "hello "
    assert not any(s for _, s in out)
    d1, s1 = stream.push(byte_tokens(tok, "l")[0])
    d2, s2 = stream.push(byte_tokens(tok, "d")[0])
    assert (d1, s1, d2, s2) == ("", False, "", True)
    assert stream.text == "hello "
    stream = TextStream(tok, ["world"], set())
    for t in byte_tokens(tok, "wox"):
        stream.push(t)
    assert stream.emitted == "wox"  # released once it can no longer become the stop string


def test_sampling_params_are_checked():
    for bad in (dict(temperature=-1), dict(top_p=0.0), dict(top_k=-1), dict(repetition_penalty=0),
                dict(max_new_tokens=-1), dict(stop=[""])):
        with pytest.raises(LmforgeError):
            SamplingParams(**bad).check()


# --- the commands ---------------------------------------------------------------------------------

def run_cli(args: list[str]) -> int:
    from lmforge.cli import main

    with pytest.raises(SystemExit) as e:
        main(args)
    return e.value.code


def test_generate_command(tmp_path, capsys):
    import shutil

    from infer_helpers import make_checkpoint

    ckpt, model, tok = make_checkpoint(tmp_path)
    run = tmp_path / "run"
    shutil.copytree(ckpt, run / "checkpoints" / "step_000005")
    want = generate(model, tok, ["Hello", "def f"], SamplingParams(max_new_tokens=10, **GREEDY))
    expected = f"Hello{want[0]}\n\ndef f{want[1]}\n"
    flags = ["--max-new-tokens", "10", "--temperature", "0"]
    assert run_cli(["generate", str(run), "--prompt", "Hello", "--prompt", "def f", *flags]) == 0
    assert capsys.readouterr().out == expected
    (tmp_path / "prompts.txt").write_text("Hello\n\ndef f\n", encoding="utf-8")
    assert run_cli(["generate", str(ckpt), "--file", str(tmp_path / "prompts.txt"), "--no-stream", *flags]) == 0
    assert capsys.readouterr().out == expected
    # a recipe-style override works as well as a flag
    assert run_cli(["generate", str(ckpt), "--prompt", "Hello", "generate.temperature=0",
                    "generate.max_new_tokens=10"]) == 0
    assert capsys.readouterr().out == f"Hello{want[0]}\n"
    assert run_cli(["generate", str(ckpt), "--prompt", "hello " * 200, *flags]) == 2
    captured = capsys.readouterr()
    assert "leaves no room" in captured.err and captured.out == ""
    assert run_cli(["generate", str(tmp_path / "nothing"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert run_cli(["generate", str(ckpt), "--prompt", "x", "--top-p", "0"]) == 2
    assert "top_p" in capsys.readouterr().err


def test_chat_command_over_piped_stdin(tmp_path):
    import os
    import subprocess
    import sys

    from infer_helpers import make_checkpoint

    from lmforge.infer.chat import ChatSession

    ckpt, model, tok = make_checkpoint(tmp_path)
    params = SamplingParams(max_new_tokens=12, **GREEDY)
    session = ChatSession(model, tok, params, system="Be brief.")
    r1 = session.send("Hello there").text
    r2 = session.send("你好?").text  # the second turn sees the first: history is kept
    session.reset()
    assert session.send("Hello there").text == r1
    proc = subprocess.run(
        [sys.executable, "-m", "lmforge", "chat", str(ckpt), "--system", "Be brief.", "--temperature", "0",
         "--max-new-tokens", "12", "--device", "cpu"],
        input="Hello there\n你好?\n/reset\nHello there\n/exit\nnot read\n", capture_output=True, text=True,
        encoding="utf-8", timeout=120, env={**os.environ, "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{r1}\n{r2}\n{r1}\n"
    assert "(history cleared)" in proc.stderr
    fresh = ChatSession(model, tok, params, system="Be brief.")
    fresh.send("你好?")
    assert fresh.messages[-1]["content"] != r2 or r1 == ""  # r2 really depended on the history


@pytest.mark.parametrize("variant", [dict(), dict(attention="mla", n_kv_head=0, kv_lora_rank=24, qk_rope_head_dim=8,
                                                  qk_nope_head_dim=16, v_head_dim=16), dict(sliding_window=4)],
                         ids=["dense", "mla", "window"])
def test_repeats_share_one_prefill_and_sample_as_the_repeated_list(variant):
    """GRPO's group: each prompt prefilled once, its cache copied G times, the same seeded samples as
    listing the prompt G times (the generator is drawn in the same order, over the same rows)."""
    model = make_model(300, **variant)
    params = SamplingParams(max_new_tokens=10, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.2)
    prompts = PROMPTS[:3]
    calls = []
    hook = model.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape))
    shared = generate_samples(model, prompts, params, generator=torch.Generator().manual_seed(5), repeats=4,
                              logprobs=True)
    assert calls[0] == (3, max(len(p) for p in prompts))  # the prefill ran once per prompt, not per sample
    hook.remove()
    listed = generate_samples(model, [p for p in prompts for _ in range(4)], params,
                              generator=torch.Generator().manual_seed(5), logprobs=True)
    assert [s.tokens for s in shared] == [s.tokens for s in listed]
    assert len({tuple(s.tokens) for s in shared[:4]}) > 1  # a group's samples differ: it really sampled
    for a, b in zip(shared, listed):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
