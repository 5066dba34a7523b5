"""`lmforge serve` throughput: continuous batching against one request at a time; prints ONE JSON.

    python bench/serve.py [--clients 1,4,16] [--n-layer 4 --n-embd 256] [--new-tokens 48] [--out FILE]

Both sides are the real HTTP server (infer/server.py, in this process on 127.0.0.1) over the same
random-weight model and tokenizer: `max_batch=16` (the default) against `max_batch=1`, the
one-request-at-a-time path. For each number of concurrent clients, each client thread sends plain
(non-streamed) greedy /v1/completions requests one after another, prompts of mixed lengths given
as token ids; the two servers run alternately, in alternating order, so drifting machine load
hits both alike. requests/s and completion tokens/s are over the wall time of all of a round's
requests; the ratio is batched over one-at-a-time, the median of the rounds' ratios. Every
greedy answer of the batched server is also compared with the one-at-a-time server's
(`same_outputs`): batching must not change what a request gets.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import log, machine  # noqa: E402


def build(args, root: Path):
    """A random-weight model and a small byte-level BPE tokenizer trained on standard-library text."""
    import inspect
    import textwrap

    from tokenizers import pre_tokenizers, trainers

    from lmforge.config import ModelConfig
    from lmforge.model.transformer import Transformer, padded_vocab
    from lmforge.tokenizer import Tokenizer, new_tokenizer

    hf, specials = new_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    trainer = trainers.BpeTrainer(vocab_size=args.vocab, min_frequency=1, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    hf.train_from_iterator([inspect.getsource(textwrap), inspect.getsource(argparse)], trainer)
    tok = Tokenizer(hf)
    tok.save(root / "tok")
    tok = Tokenizer.load(root / "tok")
    cfg = ModelConfig(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head, n_kv_head=args.n_kv_head,
                      vocab_size=padded_vocab(tok.vocab_size, 64), max_seq_len=args.ctx)
    torch.manual_seed(0)
    return Transformer(cfg).eval(), tok


def start(model, tok, max_batch: int, max_tokens: int):
    """The HTTP server on a free port, serving in a thread of this process."""
    from lmforge.infer.server import ModelService, Server

    service = ModelService(model, tok, "bench", max_tokens=max_tokens, max_waiting=256, max_batch=max_batch)
    srv = Server(("127.0.0.1", 0), service, max_body=1 << 20)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return srv


def request(srv, prompt: list[int], new_tokens: int) -> tuple[str, int, float]:
    """(text, completion tokens, seconds) of one greedy completion."""
    body = json.dumps({"prompt": prompt, "max_tokens": new_tokens, "temperature": 0})
    t = time.perf_counter()
    conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=600)
    try:
        conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        out = json.loads(r.read())
    finally:
        conn.close()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {out}")
    return out["choices"][0]["text"], out["usage"]["completion_tokens"], time.perf_counter() - t


def round_trip(srv, prompts: list[list[int]], clients: int, new_tokens: int) -> dict:
    """All prompts through `clients` concurrent clients; rates over the wall time."""
    results: list = [None] * len(prompts)
    nxt = iter(range(len(prompts)))
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                i = next(nxt, None)
            if i is None:
                return
            results[i] = request(srv, prompts[i], new_tokens)

    t = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    tokens = sum(r[1] for r in results)
    return {"wall_s": wall, "requests_per_s": len(prompts) / wall, "tokens_per_s": tokens / wall,
            "latency_s_median": statistics.median(r[2] for r in results), "texts": [r[0] for r in results],
            "tokens": tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--requests-per-client", type=int, default=3, help="requests each client sends per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--n-kv-head", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--max-batch", type=int, default=16, help="the batched server's max_batch (the peer has 1)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--out", default="", help="also write the JSON here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from lmforge.doctor import cpu_info

    cpu_name, flags = cpu_info()
    with tempfile.TemporaryDirectory() as tmp:
        model, tok = build(args, Path(tmp))
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = model.to(device)
        servers = {"batched": start(model, tok, args.max_batch, args.new_tokens),
                   "one_at_a_time": start(model, tok, 1, args.new_tokens)}
        gen = torch.Generator().manual_seed(0)
        out = {"bench": "serve",
               "model": {"n_layer": args.n_layer, "n_embd": args.n_embd, "n_head": args.n_head,
                         "n_kv_head": args.n_kv_head, "vocab": model.cfg.vocab_size, "ctx": args.ctx,
                         "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2)},
               "setup": {"new_tokens": args.new_tokens, "prompt_tokens": "8-64, uniform", "greedy": True,
                         "max_batch": args.max_batch, "rounds": args.rounds,
                         "requests_per_client": args.requests_per_client, "dtype": str(next(model.parameters()).dtype)},
               "machine": {**machine(device), "cpu_model": cpu_name,
                           "cpu_flags": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"})}}
        request(servers["batched"], [5, 6, 7], 4)  # warm-up: first-call allocations on both
        request(servers["one_at_a_time"], [5, 6, 7], 4)
        for clients in (int(c) for c in args.clients.split(",")):
            n = clients * args.requests_per_client
            runs: dict[str, list[dict]] = {"batched": [], "one_at_a_time": []}
            same = []
            for r in range(args.rounds):
                lens = torch.randint(8, 65, (n,), generator=gen).tolist()
                prompts = [torch.randint(3, tok.vocab_size, (k,), generator=gen).tolist() for k in lens]
                order = list(servers) if r % 2 == 0 else list(servers)[::-1]
                for name in order:
                    log(f"{clients} clients, round {r + 1}: {name} ...")
                    runs[name].append(round_trip(servers[name], prompts, clients, args.new_tokens))
                a, b = runs["batched"][-1]["texts"], runs["one_at_a_time"][-1]["texts"]
                same.append(sum(x == y for x, y in zip(a, b)) / n)
            entry = {}
            for name, rs in runs.items():
                entry[name] = {k: round(statistics.median(x[k] for x in rs), 3)
                               for k in ("requests_per_s", "tokens_per_s", "latency_s_median", "wall_s")}
                entry[name]["tokens_per_s_per_round"] = [round(x["tokens_per_s"], 1) for x in rs]
            ratios = [b["tokens_per_s"] / o["tokens_per_s"] for b, o in zip(runs["batched"], runs["one_at_a_time"])]
            entry["tokens_per_s_ratio"] = round(statistics.median(ratios), 3)
            entry["tokens_per_s_ratio_per_round"] = [round(x, 3) for x in ratios]
            entry["same_outputs"] = round(min(same), 4)
            entry["requests_per_round"] = n
            out[f"clients_{clients}"] = entry
            log(f"{clients} clients: batched/one-at-a-time tokens/s = {entry['tokens_per_s_ratio']}")
        out["peak_cached_tokens"] = servers["batched"].service.scheduler.peak_cached
        out["machine"]["load_avg_1min_end"] = machine(device).get("load_avg_1min")
        for srv in servers.values():
            srv.shutdown()
            srv.server_close()
    text = json.dumps(out, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
