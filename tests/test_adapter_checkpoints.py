"""LoRA and QLoRA checkpoints straight from `lmforge sft` work in every command that takes a checkpoint:
generate (also quantized), chat, serve, eval (loss and task), export hf (merged, and --adapter as a PEFT
folder), export gguf. Each one's numbers are checked against the adapters applied to the base unmerged."""

from __future__ import annotations

import io
import json
import queue
import shutil
import socketserver
import sys
import threading
import urllib.request
from pathlib import Path

import gguf
import numpy as np
import peft
import pytest
import torch
import torch.nn.functional as F
from infer_helpers import one_thread  # noqa: F401 (fixture)
from test_chat import tiny_checkpoint, write_jsonl
from test_gguf import tensors
from test_sft import EXAMPLES
from transformers import AutoModelForCausalLM

from lmforge.checkpoint import load_model, model_state
from lmforge.cli import main as cli_main
from lmforge.config import load_config
from lmforge.data.chat import read_records
from lmforge.data.sources import iter_documents
from lmforge.eval.tasks import accuracy
from lmforge.export.gguf import rope_permute
from lmforge.infer.chat import ChatSession
from lmforge.infer.engine import generate
from lmforge.infer.quant import quantize_model
from lmforge.infer.sampling import SamplingParams
from lmforge.tokenizer import Tokenizer
from lmforge.train.lora import load_adapted, load_any

GREEDY = dict(temperature=0.0, top_k=0, top_p=1.0)
IDS = torch.tensor([[1, 5, 9, 33, 70, 2, 12, 101, 7]])
PROMPT = "What is 37 + 58?"
TEXT = "The quick brown fox jumps over the lazy dog. 机器学习是人工智能的一个分支。答案是 95。\n" * 3
KINDS = ("lora", "qlora")


def sft(run: Path, data: str, *extra: str):
    from lmforge.train.sft import run_sft

    return run_sft(load_config(overrides=[
        f"run_dir={run}", f"sft.data=[{data}]", "train.progress=false",
        "train.precision=fp32", "sft.lora.enabled=true", "sft.lora.r=8",
        "sft.lora.alpha=16", "sft.train.seq_len=64", "sft.train.micro_batch=2", "sft.train.max_steps=10",
        "sft.train.lr=1e-2", "sft.train.warmup_steps=2", "sft.train.eval_every=0", "sft.train.save_every=0",
        "sft.train.log_every=1000", "sft.train.sample_every=0", *extra]))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A LoRA run whose base is its own pretraining checkpoint (sft.init_from=""), and a QLoRA run
    started from that run's folder: real checkpoints of `lmforge sft`, the usual run layout."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("adapters")
    base = tiny_checkpoint(root)
    shutil.copytree(base, root / "lora" / "checkpoints" / "step_000000")
    data = write_jsonl(root / "sft.jsonl", EXAMPLES)
    out = {"lora": sft(root / "lora", data), "qlora": sft(root / "qlora", data, f"sft.init_from={root / 'lora'}",
                                                          "sft.lora.quantize=nf4")}
    torch.set_num_threads(before)
    return root, {k: (root / k, r.checkpoint) for k, r in out.items()}


pytestmark = pytest.mark.usefixtures("one_thread")


def logits(model, ids=IDS):
    with torch.no_grad():
        out = model.eval()(ids)
    return out.logits if hasattr(out, "logits") else out


def cli(args: list[str]) -> int:
    with pytest.raises(SystemExit) as e:
        cli_main(args)
    return e.value.code


@pytest.mark.parametrize("kind", KINDS)
def test_merged_model_equals_base_plus_adapters(trained, kind):
    root, runs = trained
    run, ckpt = runs[kind]
    assert (ckpt / "adapter_model.safetensors").is_file() and not (ckpt / "model.safetensors").exists()
    merged, adapted = load_any(ckpt), load_adapted(ckpt, merge=False)
    assert isinstance(adapted, peft.PeftModel) and not isinstance(merged, peft.PeftModel)
    torch.testing.assert_close(logits(merged), logits(adapted), atol=1e-5, rtol=1e-5)
    base = load_model(root / "lora" / "checkpoints" / "step_000000")
    assert (logits(merged) - logits(base)).abs().max() > 1e-2  # the adapters changed the model


@pytest.mark.parametrize("kind", KINDS)
def test_generate_chat_and_quantized_generate(trained, kind, capsys, monkeypatch):
    run, ckpt = trained[1][kind]
    tok = Tokenizer.load(ckpt)
    params = SamplingParams(max_new_tokens=12, **GREEDY)
    flags = ["--max-new-tokens", "12", "--temperature", "0", "--device", "cpu"]
    want = generate(load_any(ckpt), tok, [PROMPT], params)[0]
    for target in ([str(run / "sft")], ["sft", f"run_dir={run}"], [str(ckpt)]):
        assert cli(["generate", *target, "--prompt", PROMPT, *flags]) == 0
        assert capsys.readouterr().out == f"{PROMPT}{want}\n"
    for mode in ("int8", "int4"):
        q = generate(quantize_model(load_any(ckpt), mode), tok, [PROMPT], params)[0]
        assert cli(["generate", str(run / "sft"), "--prompt", PROMPT, "--quantize", mode, *flags]) == 0
        assert capsys.readouterr().out == f"{PROMPT}{q}\n"

    reply = ChatSession(load_any(ckpt), tok, params, system="Be brief.").send(PROMPT).text
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{PROMPT}\n/exit\n"))
    assert cli(["chat", str(run / "sft"), "--system", "Be brief.", *flags]) == 0
    assert capsys.readouterr().out == f"{reply}\n"


@pytest.mark.parametrize("kind", KINDS)
def test_eval_loss_and_task(trained, kind, tmp_path):
    run, ckpt = trained[1][kind]
    tok = Tokenizer.load(ckpt)
    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"text": TEXT}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert cli(["eval", f"run_dir={run}", "eval.checkpoint=sft", f"eval.files=[{text}]", "eval.seq_len=16",
                "eval.batch_size=4", "device=cpu"]) == 0
    report = json.loads((run / "eval" / f"sft-{ckpt.name}-files.json").read_text())
    # The same windows through base + adapters, unmerged: mean next-token loss.
    ids = [i for d in iter_documents([str(text)]) for i in tok.encode(d.text) + [tok.eot_id]]
    n = (len(ids) - 1) // 16
    rows = torch.tensor([ids[i * 16:(i + 1) * 16 + 1] for i in range(n)])
    lg = logits(load_adapted(ckpt, merge=False), rows[:, :-1])
    want = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), rows[:, 1:].reshape(-1)).item()
    assert report["tokens"] == n * 16 and report["loss"] == pytest.approx(want, abs=1e-5)
    assert report["checkpoint"] == str(ckpt)

    task = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": PROMPT, "answer": "95"}, {"prompt": "计算 12 + 30 等于多少？",
                                                                                    "answer": "42"}])
    assert cli(["eval", f"run_dir={run}", f"eval.checkpoint={run / 'sft'}", f"eval.task={task}", "device=cpu",
                "generate.max_new_tokens=16"]) == 0
    report = json.loads((run / "eval" / f"sft-{ckpt.name}-qa.json").read_text())
    replies, _ = accuracy(load_any(ckpt), tok, read_records([task]), 8, 16)
    assert [e["reply"] for e in report["examples"]] == replies and report["total"] == 2


@pytest.mark.parametrize("kind", KINDS)
def test_serve(trained, kind, monkeypatch):
    """`lmforge serve RUN/sft` (the command, in a thread); greedy completions over HTTP equal the merged model's."""
    run, ckpt = trained[1][kind]
    started: queue.Queue = queue.Queue()
    serve_forever = socketserver.BaseServer.serve_forever

    def recording(self, *a, **k):
        started.put(self)
        return serve_forever(self, *a, **k)

    monkeypatch.setattr(socketserver.BaseServer, "serve_forever", recording)
    thread = threading.Thread(target=cli, args=(["serve", str(run / "sft"), "--port", "0", "--device", "cpu"],),
                              daemon=True)
    thread.start()
    server = None
    while server is None and thread.is_alive():  # a command that fails ends its thread: no waiting then
        try:
            server = started.get(timeout=0.5)
        except queue.Empty:
            pass
    assert server is not None, "lmforge serve stopped before serving"
    try:
        host, port = server.server_address[:2]
        url = f"http://{host}:{port}"
        models = json.loads(urllib.request.urlopen(url + "/v1/models", timeout=30).read())
        body = {"model": models["data"][0]["id"], "prompt": PROMPT, "max_tokens": 12, **GREEDY}
        req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        got = json.loads(urllib.request.urlopen(req, timeout=60).read())["choices"][0]["text"]
    finally:
        server.shutdown()
        thread.join(timeout=30)
    want = generate(load_any(ckpt), Tokenizer.load(ckpt), [PROMPT], SamplingParams(max_new_tokens=12, **GREEDY))[0]
    assert got == want


@pytest.mark.parametrize("kind", KINDS)
def test_export_hf_merged_and_as_peft_folder(trained, kind, tmp_path, monkeypatch, capsys):
    root, runs = trained
    run, ckpt = runs[kind]
    want = logits(load_adapted(ckpt, merge=False))
    assert cli(["export", "hf", str(run / "sft"), str(tmp_path / "merged")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(hf), want, atol=2e-5, rtol=1e-4)

    out = tmp_path / "peft"
    assert cli(["export", "hf", str(run / "sft"), str(out), "--adapter"]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((out / "base").resolve()) and config["task_type"] == "CAUSAL_LM"
    assert (out / "base" / "model.safetensors").is_file() and (out / "tokenizer_config.json").is_file()
    monkeypatch.chdir("/")  # PEFT resolves the base path itself: from anywhere
    by_peft = peft.AutoPeftModelForCausalLM.from_pretrained(str(out)).eval()
    assert isinstance(by_peft, peft.PeftModel)
    torch.testing.assert_close(logits(by_peft), want, atol=2e-5, rtol=1e-4)

    capsys.readouterr()
    assert cli(["export", "hf", str(root / "lora" / "checkpoints"), str(tmp_path / "x"), "--adapter"]) == 2
    assert "not a LoRA/QLoRA checkpoint" in capsys.readouterr().err and not (tmp_path / "x").exists()


@pytest.mark.parametrize("kind", KINDS)
def test_export_gguf_writes_the_merged_model(trained, kind, tmp_path):
    root, runs = trained
    run, ckpt = runs[kind]
    assert cli(["export", "gguf", str(run / "sft"), str(tmp_path / "m.gguf"), "--type", "f16"]) == 0
    got = tensors(gguf.GGUFReader(tmp_path / "m.gguf"))
    merged = model_state(load_any(ckpt))
    base = model_state(load_model(root / "lora" / "checkpoints" / "step_000000"))
    cfg = load_any(ckpt).cfg
    for ours, theirs in (("model.layers.0.self_attn.v_proj.weight", "blk.0.attn_v.weight"),
                         ("model.layers.1.mlp.down_proj.weight", "blk.1.ffn_down.weight"),
                         ("model.layers.0.self_attn.q_proj.weight", "blk.0.attn_q.weight")):
        w, b = merged[ours], base[ours]
        if ".q_proj." in ours:  # llama.cpp's RoPE layout
            w, b = rope_permute(w, cfg.n_head), rope_permute(b, cfg.n_head)
        values = got[theirs][0]
        assert np.abs(values - w.numpy()).max() < 2e-3  # f16 rounding
        assert np.abs(values - b.numpy()).max() > 1e-2, ours  # not the base: the adapters are in
