"""Run a Task's requests through a model: log-likelihoods of continuations, and greedy replies.

Log-likelihoods are batched: requests are encoded as lm-eval encodes them (context and
continuation encoded whole, so a BPE merge across the boundary is counted as it would be read;
trailing spaces of the context moved into the continuation); requests whose input is a prefix of
another's share its forward (`shared_rows`: the four letter choices of an MMLU question are one
row); rows are sorted by length so a batch pads little, and right-padded (a causal model's
earlier positions never see the padding). Only the continuation positions go through the head,
so a large vocabulary costs (continuation tokens x vocab) per request, not (sequence x vocab).
"""

from __future__ import annotations

import random

import torch
from torch import nn

from lmforge.console import progress
from lmforge.eval.tasks.base import FEWSHOT_DELIMITER, Task, cut_at_stop, score_gen, score_mc

HEAD_CHUNK = 1024  # continuation positions per head call: 1024 x a 150k vocabulary is 600 MB of fp32 logits


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) exactly as lm-eval's Hugging Face model encodes them, so the
    figures can be quoted beside lm-eval's: the tokenizer's BOS in front when it adds one (Llama's do,
    lmforge's byte-level ones do not), and an empty context scored after `prefix_id`."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context) if context else []
    return (list(tok.doc_prefix) + ctx if ctx else [prefix_id(tok)]), whole[len(ctx):]


def prefix_id(tok) -> int:
    """What an empty context (and lm-eval's rolling windows) condition on: BOS if the tokenizer has one, else
    end-of-text, as lm-eval's `prefix_token_id`."""
    return tok.bos_id if tok.bos_id is not None else tok.eot_id


def shared_rows(inputs: list[tuple[int, ...]]) -> dict[tuple[int, ...], tuple[int, ...]]:
    """Each input -> the row whose forward also serves it: the longest input it is a prefix of.

    A causal model's logits at position t depend only on tokens <= t, so one forward over a row gives
    every prefix of it. The choices A/B/C/D of an MMLU question need the same input (the question)
    and become one row; a continuation that extends another shares its row. In lexicographic order
    every input with prefix p directly follows p, so one backwards pass finds the rows.
    """
    order = sorted(set(inputs))
    row = {}
    for i in range(len(order) - 1, -1, -1):
        a = order[i]
        nxt = order[i + 1] if i + 1 < len(order) else None
        row[a] = row[nxt] if nxt is not None and nxt[:len(a)] == a else a
    return row


def loglikelihoods(model: nn.Module, tok, requests: list[tuple[str, str]], batch_size: int = 16,
                   label: str = "score") -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), whether every continuation token is the argmax) per request."""
    max_len = model.cfg.max_seq_len
    encoded: dict[tuple[str, str], tuple[tuple[int, ...], int]] = {}
    for req in requests:
        if req not in encoded:
            ctx, cont = encode_pair(tok, *req)
            ids = tuple((ctx + cont)[-(max_len + 1):])  # keep the continuation, drop the context's oldest tokens
            encoded[req] = (ids, min(len(cont), len(ids) - 1))
    return token_loglikelihoods(model, [encoded[r] for r in requests], tok.eot_id, batch_size, label)


@torch.no_grad()
def token_loglikelihoods(model: nn.Module, items: list[tuple[tuple[int, ...], int]], pad_id: int,
                         batch_size: int = 16, label: str = "score") -> list[tuple[float, bool]]:
    """Per (ids, n): the summed log-probability of the last n of `ids` given the ones before, and whether
    each was the argmax. Shared prefixes share a forward; rows are right-padded with `pad_id`."""
    device = next(model.parameters()).device
    unique = list(dict.fromkeys(items))
    # Input of an item: every token but the last (whose probability is read, not fed).
    row_of = shared_rows([ids[:-1] for ids, _ in unique])
    rows = sorted(set(row_of.values()), key=lambda r: -len(r))
    by_row: dict[tuple[int, ...], list[tuple[tuple[int, ...], int]]] = {}
    for item in unique:
        by_row.setdefault(row_of[item[0][:-1]], []).append(item)
    results: dict[tuple[tuple[int, ...], int], tuple[float, bool]] = {}
    batches = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    with progress(label, len(batches)) as advance:
        for batch in batches:
            x = torch.full((len(batch), len(batch[0])), pad_id, dtype=torch.long)
            for i, r in enumerate(batch):
                x[i, :len(r)] = torch.tensor(r)
            h = model(x.to(device), return_hidden=True)
            # One head call for every scored position of the batch, then split per item.
            its = [it for r in batch for it in by_row[r]]
            where = [(i, len(ids) - 1 - n, n)  # (row, first position, n)
                     for i, r in enumerate(batch) for ids, n in by_row[r]]
            rows_idx = torch.tensor([i for i, _, n in where for _ in range(n)], device=h.device, dtype=torch.long)
            pos_idx = torch.tensor([s + j for _, s, n in where for j in range(n)], device=h.device, dtype=torch.long)
            targets = torch.tensor([t for ids, n in its for t in ids[len(ids) - n:]], device=h.device,
                                   dtype=torch.long)
            token_ll: list[float] = []
            hits: list[bool] = []
            for c in range(0, len(targets), HEAD_CHUNK):  # bounded (positions x vocab) logits
                sl = slice(c, c + HEAD_CHUNK)
                logp = model.logits(h[rows_idx[sl], pos_idx[sl]]).float().log_softmax(-1)
                token_ll += logp.gather(-1, targets[sl, None])[:, 0].tolist()
                hits += (logp.argmax(-1) == targets[sl]).tolist()
            k = 0
            for it, (_, _, n) in zip(its, where):
                results[it] = (sum(token_ll[k:k + n]), all(hits[k:k + n]))
                k += n
            advance(1)
    return [results[it] for it in items]


# --- prompts: few-shot examples and the chat template --------------------------------------------------

def fewshot_prefix(task: Task, index: int, k: int, seed: int) -> str:
    """`k` worked examples for doc `index`, drawn with a seed of their own per doc (so a result does not
    depend on which other docs were evaluated), from the task's train/dev pool or else the other docs."""
    head = task.docs[index].description
    if k <= 0:
        return head
    pool = task.fewshot_pool or task.docs
    candidates = [d for j, d in enumerate(pool) if task.fewshot_pool or j != index]
    shots = random.Random(seed * 1_000_003 + index).sample(candidates, min(k, len(candidates)))
    return head + "".join(s.shot() + FEWSHOT_DELIMITER for s in shots)


def render_context(tok, prefix: str, context: str, chat: bool) -> str:
    """The text a continuation is scored (or a reply sampled) after; in chat mode the question is one user
    turn of the checkpoint's chat template and the answer the assistant's reply."""
    if not chat:
        return prefix + context
    return tok.render_chat([{"role": "user", "content": (prefix + context).rstrip()}], add_generation_prompt=True)


def mc_requests(task: Task, tok, k: int, seed: int, chat: bool) -> list[list[tuple[str, str]]]:
    """Per doc, one (context, continuation) per choice (the same continuation for every choice of a
    Winogrande doc, whose contexts differ)."""
    out = []
    for i, d in enumerate(task.docs):
        prefix = fewshot_prefix(task, i, k, seed)
        delim = "" if chat else d.delimiter
        if task.kind == "cloze":
            out.append([(render_context(tok, prefix, d.context(), chat), delim + str(d.gold))])
        elif len(d.contexts) > 1:  # partial scoring: the choice is in the context
            out.append([(render_context(tok, prefix, c, chat), delim + d.continuation) for c in d.contexts])
        else:
            out.append([(render_context(tok, prefix, d.context(), chat), delim + c) for c in d.choices])
    return out


@torch.no_grad()
def greedy_replies(model: nn.Module, tok, prompts: list[str], max_new_tokens: int, batch_size: int,
                   stop: tuple[str, ...], temperature: float = 0.0, seed: int = 0) -> list[str]:
    """A reply per prompt, cut at `stop`: greedy, or sampled (temperature > 0) from a seeded generator."""
    from lmforge.infer.engine import default_stop_ids, generate_ids
    from lmforge.infer.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature)
    generator = None
    if temperature > 0:
        generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    stop_ids = default_stop_ids(tok)
    room = max(1, model.cfg.max_seq_len - max_new_tokens)
    replies: list[str] = []
    batches = range(0, len(prompts), batch_size)
    with progress("generate", len(batches)) as advance:
        for b in batches:
            ids = [(list(tok.doc_prefix) + tok.encode(p))[-room:] for p in prompts[b:b + batch_size]]
            out = generate_ids(model, ids, params, stop_ids=stop_ids, generator=generator,
                               vocab_limit=tok.vocab_size)
            replies += [cut_at_stop(tok.decode([t for t in o if t not in stop_ids]), stop) for o in out]
            advance(1)
    return replies


def run_task(model: nn.Module, tok, task: Task, k: int = 0, seed: int = 1234, chat: bool = False,
             batch_size: int = 16, max_new_tokens: int = 256, samples: int = 1, temperature: float = 0.8,
             exec_timeout: float = 10.0) -> list[dict]:
    """Per doc: its metrics (acc, acc_norm, exact_match or pass@k) and what the model chose or said."""
    if task.kind in ("code", "gen"):
        prompts = [render_context(tok, fewshot_prefix(task, i, k, seed), d.context(), chat)
                   for i, d in enumerate(task.docs)]
    if task.kind == "code":
        from lmforge.eval.tasks.code import score_code

        n = max(1, samples)
        flat = greedy_replies(model, tok, [p for p in prompts for _ in range(n)], max_new_tokens, batch_size,
                              task.stop, temperature if n > 1 else 0.0, seed)
        return [{**score_code(d, flat[i * n:(i + 1) * n], timeout=exec_timeout), "where": d.where,
                 "reply": flat[i * n]} for i, d in enumerate(task.docs)]
    if task.kind == "gen":
        replies = greedy_replies(model, tok, prompts, max_new_tokens, batch_size, task.stop)
        return [{**score_gen(task, d, r), "where": d.where, "reply": r} for d, r in zip(task.docs, replies)]
    per_doc = mc_requests(task, tok, k, seed, chat)
    flat = [r for reqs in per_doc for r in reqs]
    scored = iter(loglikelihoods(model, tok, flat, batch_size, task.name))
    out = []
    for d, reqs in zip(task.docs, per_doc):
        lls = [next(scored) for _ in reqs]
        if task.kind == "cloze":
            out.append({"acc": float(lls[0][1]), "where": d.where, "loglikelihood": lls[0][0]})
        else:
            values = [ll for ll, _ in lls]
            out.append({**score_mc(d, values), "where": d.where, "loglikelihoods": values})
    return out

