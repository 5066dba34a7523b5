"""The encoder-decoder family (model/t5.py): transformers parity, span corruption, seq2seq data, cached
decoding, and training on the one loop (golden losses, kill-and-resume)."""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest
import torch
from infer_helpers import one_thread  # noqa: F401 (fixture)
from safetensors.torch import load_file
from spine import TINY, copy_run, lmforge, lmforge_batch, make_corpus
from transformers import T5Config, T5ForConditionalGeneration
from transformers.models.t5.modeling_t5 import T5Attention as HFT5Attention

from lmforge.checkpoint import hf_config, load_model, save_checkpoint
from lmforge.config import ConfigError, load_config
from lmforge.data.chat import Record, read_records
from lmforge.data.spans import SpanBatches, corrupt, noise_mask, seq2seq_fields, span_counts
from lmforge.errors import LmforgeError
from lmforge.export.hf import export_hf
from lmforge.export.hf_import import import_hf
from lmforge.infer.engine import generate_ids
from lmforge.infer.sampling import SamplingParams
from lmforge.model.presets import model_config
from lmforge.model.t5 import T5, relative_position_bucket

pytestmark = pytest.mark.usefixtures("one_thread")


def t5_model(seed: int = 0, **kw) -> T5:
    """t5-tiny with a 3-block decoder (not the encoder's 2) and norm gains away from 1."""
    cfg = model_config("t5-tiny", vocab_size=96, decoder_start_id=0, n_decoder_layer=3, **kw)
    torch.manual_seed(seed)
    model = T5(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


# --- transformers parity -----------------------------------------------------------------------------

@pytest.mark.parametrize("tie", [False, True])
def test_export_loads_in_transformers_with_equal_logits(tmp_path, tie):
    model = t5_model(tie_embeddings=tie)
    ckpt = save_checkpoint(tmp_path / "ckpt", model)
    hf = T5ForConditionalGeneration.from_pretrained(export_hf(ckpt, tmp_path / "hf")).eval()
    x, y = torch.randint(1, 96, (2, 11)), torch.randint(1, 96, (2, 7))
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, 8:] = False  # a padded source
    with torch.no_grad():
        ours = model(x, attention_mask=mask, decoder_input_ids=y)
        theirs = hf(input_ids=x, attention_mask=mask, decoder_input_ids=y).logits
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
        # The loss path (fused head + cross-entropy, labels shifted right inside) is transformers' mean x count.
        labels = y.clone()
        labels[0, 5:] = -100
        loss = model(x, labels=labels, attention_mask=mask) / (labels != -100).sum()
        assert loss.item() == pytest.approx(hf(input_ids=x, attention_mask=mask, labels=labels).loss.item(), abs=1e-5)
    # The checkpoint folder itself is a transformers folder too, and import reads the export back unchanged.
    again = import_hf(tmp_path / "hf", tmp_path / "imported")
    back = load_model(again)
    with torch.no_grad():
        torch.testing.assert_close(back(x, attention_mask=mask, decoder_input_ids=y), ours, atol=0, rtol=0)


def test_relative_bias_equals_transformers():
    model = t5_model()
    rel = torch.arange(-300, 300).unsqueeze(0)
    for bidirectional in (True, False):
        for buckets, distance in ((32, 128), (16, 64)):
            want = HFT5Attention._relative_position_bucket(rel, bidirectional, buckets, distance)
            assert torch.equal(relative_position_bucket(rel, bidirectional, buckets, distance), want)
    ours = {"encoder": model.encoder.bias_module, "decoder": model.decoder.bias_module}
    cfg = hf_config(model.cfg)
    cfg.pop("lmforge")
    theirs = T5ForConditionalGeneration(T5Config(**cfg)).eval()
    theirs.load_state_dict(model.state_dict(), strict=False)
    for name, attn in ours.items():
        other = getattr(theirs, name).block[0].layer[0].SelfAttention
        with torch.no_grad():  # beyond max_distance, so the logarithmic buckets and the clamp are compared too
            torch.testing.assert_close(attn.compute_bias(90, 90, 0, torch.device("cpu")), other.compute_bias(90, 90))


# --- span corruption ---------------------------------------------------------------------------------

def test_span_corruption_density_sentinels_and_reconstruction():
    tokens = np.arange(1000, 1100)
    sentinels = list(range(500, 520))
    mask = noise_mask(100, 0.15, 3.0, np.random.default_rng(0))
    noise, spans = span_counts(100, 0.15, 3.0)
    assert (noise, spans) == (15, 5) and mask.sum() == 15 and not mask[0]
    assert int((mask[1:] & ~mask[:-1]).sum()) == spans  # five runs of noise
    source, target = corrupt(tokens, mask, sentinels, eos=0)
    assert len(source) == 100 - 15 + 5 + 1 and len(target) == 15 + 5 + 1 and source[-1] == target[-1] == 0
    assert [t for t in source if t in sentinels] == sentinels[:5] == [t for t in target if t in sentinels]
    # Putting each span back where its sentinel stands gives the window again.
    pieces, current = {}, None
    for t in target[:-1]:
        if t in sentinels:
            current = t
            pieces[t] = []
        else:
            pieces[current].append(t)
    rebuilt = [x for t in source[:-1] for x in (pieces[t] if t in sentinels else [t])]
    assert rebuilt == tokens.tolist()


class _Windows:
    seq_len = 64

    def __len__(self) -> int:
        return 40

    def get(self, i: int) -> np.ndarray:
        return np.arange(i * 64, i * 64 + 65) % 300 + 1


def test_span_corruption_is_deterministic_given_the_seed():
    def stream(seed: int) -> SpanBatches:
        return SpanBatches(_Windows(), 0.15, 3.0, list(range(400, 500)), 0, 4, 1, 0, 1, seed)

    a, b, c = stream(1), stream(1), stream(2)
    assert a.example(7, 0) == b.example(7, 0) and a.example(7, 0) != a.example(7, 1)
    assert a.example(7, 0) != c.example(7, 0)
    (xa, ya), (xb, yb) = a.next_step()[0], b.next_step()[0]
    assert torch.equal(xa, xb) and torch.equal(ya, yb) and xa.shape == (4, 64 - 10 + 3 + 1)
    densities = [float(np.mean(noise_mask(64, 0.15, 3.0, np.random.default_rng([1, 0, i])))) for i in range(20)]
    assert set(densities) == {10 / 64}  # round(64 x 0.15) noise tokens in every window


# --- seq2seq examples --------------------------------------------------------------------------------

def test_seq2seq_records_errors_name_file_line_and_key(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"source": "a b", "target": "b a"}\n{"input": "x", "output": "y"}\n')
    assert [seq2seq_fields(r) for r in read_records([str(good)])] == [("a b", "b a"), ("x", "y")]
    cases = {'{"source": "a"}': r'bad\.jsonl:2: has "source" but no "target"',
             '{"source": 3, "target": "x"}': r'bad\.jsonl:2: "source" must be a string, got int',
             '{"input": "a", "output": "  "}': r'bad\.jsonl:2: "output" is empty',
             '{"text": "a"}': r'bad\.jsonl:2: no "source"/"target" \(or "input"/"output"\) keys; found \'text\'',
             '{"source": "a", ': r"bad\.jsonl:2: invalid JSON"}
    for line, message in cases.items():
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"source": "a", "target": "b"}\n' + line + "\n")
        with pytest.raises(LmforgeError, match=message):
            [seq2seq_fields(r) for r in read_records([str(bad)])]
    with pytest.raises(LmforgeError, match="r.jsonl:1"):
        seq2seq_fields(Record({"target": "x"}, "r.jsonl:1"))


def test_t5_config_refuses_what_it_is_not_built_of():
    with pytest.raises(ConfigError, match=r"model\.pos=rope with model\.arch=t5"):
        load_config(overrides=["model.preset=t5-tiny", "model.pos=rope"])
    with pytest.raises(ConfigError, match=r"model\.mlp=gated-gelu is T5's"):
        load_config(overrides=["model.mlp=gated-gelu"])
    with pytest.raises(ConfigError, match=r"model\.moe\.experts"):
        load_config(overrides=["model.preset=t5-tiny", "model.moe.experts=4"])


def test_model_info_counts_t5_small_as_transformers_does(capsys):
    from lmforge.cli import main as cli_main

    with pytest.raises(SystemExit) as e:
        cli_main(["model", "info", "t5-small", "--vocab", "32128"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    with torch.device("meta"):  # google/t5-v1_1-small's config; transformers shares lm_head, v1.1 does not
        hf = T5ForConditionalGeneration(T5Config(vocab_size=32128, d_model=512, d_kv=64, d_ff=1024, num_layers=8,
                                                 num_heads=6, feed_forward_proj="gated-gelu"))
    n = sum(p.numel() for p in hf.parameters()) + 32128 * 512
    assert f"parameters        {n / 1e6:10.1f} M" in out and "8 encoder + 8 decoder blocks" in out
    with pytest.raises(SystemExit) as e:
        cli_main(["model", "info", "t5-small", "--gpus", "8", "--gpu-mem", "16GB"])
    assert e.value.code != 0 and "--gpus with model.arch=t5" in capsys.readouterr().err


# --- generation --------------------------------------------------------------------------------------

def test_greedy_with_the_cache_equals_greedy_without():
    model = t5_model(seed=3)
    prompts = [[5, 9, 13, 2, 7, 40], [11, 3], [60, 61, 62, 63]]  # lengths differ: padded sources
    got = generate_ids(model, prompts, SamplingParams(max_new_tokens=10, temperature=0.0))
    for p, out in zip(prompts, got):
        src, dec = torch.tensor([p]), [model.cfg.decoder_start_id]
        with torch.no_grad():
            for _ in range(10):  # the whole decoder input again at every step, no cache
                dec.append(int(model(src, decoder_input_ids=torch.tensor([dec]))[0, -1].argmax()))
        assert out == dec[1:]
    stop = got[1][2]
    stopped = generate_ids(model, prompts, SamplingParams(max_new_tokens=10, temperature=0.0), stop_ids={stop})
    # A row that stops leaves the batch (the cache drops its row); the others go on unchanged.
    assert stopped == [g[:g.index(stop) + 1] if stop in g else g for g in got]
    assert any(len(s) < 10 for s in stopped) and any(len(s) == 10 for s in stopped)


# --- training on the loop ------------------------------------------------------------------------------

T5_TINY = ["model.preset=t5-tiny", "train.seq_len=48", *[k for k in TINY if k.startswith("train.")
                                                          and not k.startswith("train.seq_len")]]
# The first 10 span-corruption losses of the seeded run below. They change only if the model's numerics,
# the corruption, or the spine's data / tokenizer / optimizer change; then look why before pinning new ones.
GOLDEN = [6.987884521484375, 6.8333587646484375, 6.520291328430176, 5.975156307220459, 5.938830375671387,
          5.539524078369141, 5.76407527923584, 5.28084659576416, 5.282101631164551, 5.098161220550537]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """tokenizer (with T5's sentinels) + shards of the spine's corpus."""
    from lmforge.stages import run_prepare, run_tokenizer

    root = tmp_path_factory.mktemp("t5")
    cfg = load_config(overrides=[f"run_dir={root / 'run'}", f"data.sources=[{make_corpus(root / 'corpus')}]",
                                 "tokenizer.vocab_size=512", "data.val_fraction=0.15", "data.workers=1",
                                 "model.arch=t5"])
    run_tokenizer(cfg)
    run_prepare(cfg)
    return root / "run"


def losses(folder) -> dict[int, float]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def weights_equal(a, b) -> bool:
    a, b = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_span_pretraining_golden_losses_and_kill_and_resume(base_run, tmp_path):
    common = [*T5_TINY, "train.max_steps=10", "train.save_every=5"]
    straight = copy_run(base_run, tmp_path / "straight")
    r = lmforge("pretrain", f"run_dir={straight}", *common)
    assert r.returncode == 0, r.stderr
    got = losses(straight)
    assert [got[s] for s in range(1, 11)] == pytest.approx(GOLDEN, abs=1e-4), json.dumps([got[s] for s in range(1, 11)])
    killed = copy_run(base_run, tmp_path / "killed")
    r = lmforge("pretrain", f"run_dir={killed}", *common, env={"LMFORGE_FAULT": "step:7"})
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr)
    r = lmforge("pretrain", f"run_dir={killed}", *common)
    assert r.returncode == 0 and "resumed" in r.stderr, r.stderr
    assert losses(killed) == got
    assert weights_equal(straight / "checkpoints" / "step_000010", killed / "checkpoints" / "step_000010")
    model = load_model(straight / "checkpoints" / "step_000010")
    assert model.cfg.arch == "t5" and model.cfg.decoder_start_id == 0


def test_seq2seq_from_scratch_resumes_exactly_and_evaluates(base_run, tmp_path):
    data = tmp_path / "pairs.jsonl"
    rng = np.random.default_rng(0)
    with data.open("w") as f:
        for _ in range(120):
            words = [f"w{int(i)}" for i in rng.integers(0, 9, 3)]
            f.write(json.dumps({"source": " ".join(words), "target": " ".join(reversed(words))}) + "\n")
    runs = {n: copy_run(base_run, tmp_path / n) for n in ("straight", "halves")}
    # A constant schedule after warmup: the 3-step first half then plans the same learning rates as 6 steps.
    common = ["seq2seq.init_from=scratch", f"seq2seq.data=[{data}]", "seq2seq.val_fraction=0.1", *T5_TINY,
              "seq2seq.target_len=12", "train.schedule=constant", "train.warmup_steps=2", "train.save_every=3",
              "train.eval_every=6"]
    done = lmforge_batch({"straight": ["seq2seq", f"run_dir={runs['straight']}", *common, "train.max_steps=6"],
                          "first": ["seq2seq", f"run_dir={runs['halves']}", *common, "train.max_steps=3"],
                          "second": ["seq2seq", f"run_dir={runs['halves']}", *common, "train.max_steps=6"],
                          "eval": ["eval", f"run_dir={runs['straight']}",
                                   f"eval.checkpoint={runs['straight'] / 'seq2seq'}", f"eval.files=[{data}]",
                                   "eval.max_batches=2", "generate.max_new_tokens=8"]})
    for name, (code, err) in done.items():
        assert code == 0, (name, err[-3000:])
    assert "resumed" in done["second"][1]
    a, b = runs["straight"] / "seq2seq", runs["halves"] / "seq2seq"
    assert losses(a) == losses(b) and len(losses(a)) == 6
    assert weights_equal(a / "checkpoints" / "step_000006", b / "checkpoints" / "step_000006")
    result = json.loads(next((runs["straight"] / "eval").glob("*seq2seq.json")).read_text())
    assert result["examples"] == 16 and 0 <= result["exact_match"] <= 1 and result["loss"] < 6.3


def test_serve_completes_a_source_as_generate_does(base_run, tmp_path):
    """`serve` runs an encoder-decoder one request at a time (the continuous batch is for decoders): a greedy
    completion equals the engine's greedy output for the same source, and chat is refused by name."""
    from test_server import start_server, stop_server

    from lmforge.infer.engine import complete
    from lmforge.infer.loading import load_for_inference
    from lmforge.infer.sampling import SamplingParams

    run = copy_run(base_run, tmp_path / "r")
    done = lmforge_batch({"pre": ["pretrain", f"run_dir={run}", *T5_TINY, "train.max_steps=2", "train.save_every=2"]})
    assert done["pre"][0] == 0, done["pre"][1][-3000:]
    ckpt = run / "checkpoints" / "step_000002"
    served = start_server(ckpt)
    try:
        status, body = served.raw("POST", "/v1/completions", json.dumps(
            {"prompt": "def f(x):", "max_tokens": 6, "temperature": 0}).encode(), {"Content-Type": "application/json"})
        assert status == 200, body
        text = json.loads(body)["choices"][0]["text"]
        status, body = served.raw("POST", "/v1/chat/completions", json.dumps(
            {"messages": [{"role": "user", "content": "hi"}]}).encode(), {"Content-Type": "application/json"})
        assert status == 400 and b"encoder-decoder" in body
    finally:
        stop_server(served)
    model, tok, _ = load_for_inference(ckpt, "cpu", "fp32", None)
    want = complete(model, tok, ["def f(x):"], SamplingParams(max_new_tokens=6, temperature=0.0))[0]
    assert text == want.text


def test_benchmarks_refuse_an_encoder_decoder_and_name_its_evaluation(tmp_path):
    """eval.tasks and the lm-eval adapter score a decoder's continuations; a T5 checkpoint is pointed to
    `lmforge eval eval.files=...` instead of failing inside the scorer."""
    from lmforge.eval.suite import refuse_encoder_decoder

    with pytest.raises(LmforgeError, match=r"encoder-decoder \(T5\).*eval.tasks.*eval.files"):
        refuse_encoder_decoder(t5_model(), tmp_path, "eval.tasks")


@pytest.mark.parametrize("task", ["sort", "reverse"])
def test_word_list_tasks_hold_out_their_test_lists(task):
    """The t5 demos' data: right targets, seeded, and no held-out list (for sort: no set of words) trained on."""
    from lmforge.data.wordlists import WORDS, make_lists

    train, test = make_lists(task, 0, 3000, 200)
    assert (train, test) == make_lists(task, 0, 3000, 200) and make_lists(task, 1, 3000, 200) != (train, test)
    assert len(train) == 3000 and len(test) == 200
    for ex in train + test:
        head, words = ex["source"].split(": ")
        words = words.split()
        assert head == task and 3 <= len(words) <= 8 and len(set(words)) == len(words) and set(words) <= set(WORDS)
        assert ex["target"].split() == (sorted(words) if task == "sort" else words[::-1])
    key = (lambda ex: frozenset(ex["source"].split()[1:])) if task == "sort" else (lambda ex: ex["source"])
    assert len({key(ex) for ex in test}) == 200 and not {key(ex) for ex in test} & {key(ex) for ex in train}
    # the reverse task's lists are those of its first version, so its measured figures still hold
    if task == "reverse":
        assert test[0]["source"] == "reverse: piano river light flame earth bread"
