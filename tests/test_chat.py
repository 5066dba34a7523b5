"""Chat data: every example format, the assistant-only loss mask, packing, errors that name file and line.

Also home of the small fixtures the post-training tests share (a tiny tokenizer and checkpoint).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import trainers

from lmforge.data.chat import (
    SFTBatches,
    collate_sft,
    pack,
    preference_messages,
    prompt_messages,
    read_records,
    render_conversation,
    sft_messages,
    shift,
)
from lmforge.errors import LmforgeError
from lmforge.model.loss import IGNORE
from lmforge.tokenizer import CHAT_TEMPLATE, Tokenizer, new_tokenizer, render_chat

TEXTS = ["What is 37 + 58? The answer is 95.", "计算 37 + 58 等于多少？答案是 95。", "You are a helpful assistant.",
         "机器学习是人工智能的一个分支。今天天气很好。", "user assistant system hello world"] * 20


def tiny_tokenizer(vocab_size: int = 400) -> Tokenizer:
    tok, specials = new_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    from tokenizers import pre_tokenizers

    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS, trainer)
    return Tokenizer(tok, CHAT_TEMPLATE, 256)


def tiny_checkpoint(root: Path, seed: int = 0, **model) -> Path:
    """A saved 2-layer, 64-wide model with its tokenizer: the start of every post-training test."""
    from lmforge.checkpoint import save_checkpoint
    from lmforge.config import ModelConfig
    from lmforge.model.transformer import Transformer

    tok = tiny_tokenizer()
    tok_dir = root / "tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    tok.save(tok_dir)
    cfg = ModelConfig(n_layer=2, n_embd=64, n_head=4, vocab_size=448, max_seq_len=128, **model)
    torch.manual_seed(seed)
    return save_checkpoint(root / "base" / "step_000000", Transformer(cfg), tokenizer_dir=tok_dir)


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return tiny_tokenizer()


def records(tmp_path: Path, rows: list[dict], name: str = "d.jsonl"):
    return read_records([write_jsonl(tmp_path / name, rows)])


def test_mask_marks_exactly_assistant_turns_and_end_tokens_multiturn_chinese(tok):
    msgs = [{"role": "system", "content": "你是一个乐于助人的助手。"},
            {"role": "user", "content": "计算 37 + 58 等于多少？"},
            {"role": "assistant", "content": "答案是 95。"},
            {"role": "user", "content": "再加 5 呢？"},
            {"role": "assistant", "content": "答案是 100。"}]
    ids, mask = render_conversation(tok, msgs)
    assert len(ids) == len(mask)
    # The ids are the tokenizer's chat template, token for token.
    assert tok.decode(ids) == render_chat(msgs)
    # Masked tokens form exactly two spans: each assistant reply followed by <|im_end|>.
    spans, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    assert [tok.decode(s) for s in spans] == ["答案是 95。<|im_end|>", "答案是 100。<|im_end|>"]
    assert all(s[-1] == tok.im_end_id for s in spans)
    assert sum(mask) == sum(len(tok.encode(m["content"])) + 1 for m in msgs if m["role"] == "assistant")
    # Shifted for next-token prediction: targets are the masked tokens, nothing else.
    x, y = shift(ids, mask)
    assert [t for t in y if t != IGNORE] == [i for i, m in zip(ids, mask) if m]


def test_generation_prompt_matches_template(tok):
    msgs = [{"role": "user", "content": "What is 2 + 2?"}]
    ids, mask = render_conversation(tok, msgs, add_generation_prompt=True)
    assert tok.decode(ids) == render_chat(msgs, add_generation_prompt=True) and not any(mask)


def test_all_sft_formats_give_the_same_conversation(tmp_path):
    want = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    rows = [{"messages": want}, {"prompt": "Q", "completion": "A"}, {"instruction": "Q", "output": "A"},
            {"instruction": "Q", "response": "A"},
            {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
            {"instruction": "Q", "input": "", "output": "A"}]
    for r in records(tmp_path, rows):
        assert sft_messages(r) == want, r.where
    alpaca = records(tmp_path, [{"instruction": "Q", "input": "ctx", "output": "A", "system": "S"}])[0]
    assert sft_messages(alpaca) == [{"role": "system", "content": "S"}, {"role": "user", "content": "Q\n\nctx"},
                                    {"role": "assistant", "content": "A"}]


def test_json_array_and_preference_and_prompt_formats(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"prompt": "Q", "chosen": "good", "rejected": "bad"},
                                {"instruction": "Q", "chosen": "good", "rejected": "bad"},
                                {"prompt": [{"role": "user", "content": "Q"}],
                                 "chosen": [{"role": "assistant", "content": "good"}],
                                 "rejected": [{"role": "assistant", "content": "bad"}]},
                                {"chosen": [{"role": "user", "content": "Q"},
                                            {"role": "assistant", "content": "good"}],
                                 "rejected": [{"role": "user", "content": "Q"},
                                              {"role": "assistant", "content": "bad"}]}],
                               indent=1), encoding="utf-8")
    recs = read_records([str(path)])
    user = [{"role": "user", "content": "Q"}]
    for r in recs:
        assert preference_messages(r) == (user, [{"role": "assistant", "content": "good"}],
                                          [{"role": "assistant", "content": "bad"}])
    assert recs[1].where.endswith("p.json:7")  # the line where the item starts
    rl = records(tmp_path, [{"prompt": "Q", "answer": "4"},
                            {"messages": user + [{"role": "assistant", "content": "x"}]}])
    assert [prompt_messages(r) for r in rl] == [user, user]


@pytest.mark.parametrize("row, needle", [
    ({"messages": [{"role": "bot", "content": "x"}]}, "d.jsonl:2: messages[0].role is 'bot'"),
    ({"messages": [{"role": "user"}]}, "d.jsonl:2: messages[0] has no field 'content'"),
    ({"prompt": 3, "completion": "x"}, "d.jsonl:2: field 'prompt' must be a string"),
    ({"text": "x"}, "d.jsonl:2: not an SFT example (fields: text)"),
    ({"messages": [{"role": "user", "content": "only a question"}]}, "d.jsonl:2: the conversation has no assistant"),
])
def test_errors_name_file_line_and_field(tmp_path, tok, row, needle):
    ok = {"prompt": "Q", "completion": "A"}
    recs = records(tmp_path, [ok, row])
    with pytest.raises(LmforgeError, match=None) as e:
        render_conversation(tok, sft_messages(recs[1]), where=recs[1].where)
    assert needle in str(e.value)


def test_invalid_json_and_truncated_to_nothing(tmp_path, tok):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": oops}\n', encoding="utf-8")
    with pytest.raises(LmforgeError, match=r"bad.jsonl:2: invalid JSON"):
        read_records([str(bad)])
    long_prompt = [{"role": "user", "content": "hello world " * 50}, {"role": "assistant", "content": "A"}]
    with pytest.raises(LmforgeError, match=r"x.jsonl:9: cut to 16 tokens, no assistant token is left"):
        render_conversation(tok, long_prompt, max_len=16, where="x.jsonl:9")


def test_packing_keeps_examples_apart_and_matches_unpacked_logits(tok):
    from lmforge.config import ModelConfig
    from lmforge.model.transformer import Transformer

    convs = [[{"role": "user", "content": f"What is {i} + {i}?"}, {"role": "assistant", "content": f"{2 * i}"}]
             for i in range(5)]
    examples = [shift(*render_conversation(tok, c)) for c in convs]
    rows = pack(examples, range(5), 64)
    assert sorted(i for r in rows for i in r) == list(range(5)) and len(rows) < 5
    batch = collate_sft(examples, rows, 64, True, tok.eot_id)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(n_layer=2, n_embd=64, n_head=4, vocab_size=448, max_seq_len=128)).eval()
    with torch.no_grad():
        packed = model(batch["input_ids"], positions=batch["positions"], doc_ids=batch["doc_ids"])
        for b, row in enumerate(rows):
            t = 0
            for i in row:
                x = torch.tensor([examples[i][0]])
                alone = model(x)
                n = x.shape[1]
                torch.testing.assert_close(packed[b, t:t + n], alone[0], atol=1e-5, rtol=1e-5)
                t += n
    assert int((batch["targets"] != IGNORE).sum()) == sum(sum(t != IGNORE for t in e[1]) for e in examples)


def test_stream_is_seeded_resumable_and_rank_split(tok):
    examples = [shift(*render_conversation(tok, [{"role": "user", "content": "q" * (i % 7 + 1)},
                                                 {"role": "assistant", "content": "a"}])) for i in range(40)]
    s = SFTBatches(examples, 32, True, 0, micro_batch=2, accum=2, rank=0, world=1, seed=3)
    steps = [s.next_step() for _ in range(6)]
    t = SFTBatches(examples, 32, True, 0, micro_batch=2, accum=2, rank=0, world=1, seed=3)
    for _ in range(3):
        t.next_step()
    state = t.state_dict()
    u = SFTBatches(examples, 32, True, 0, micro_batch=2, accum=2, rank=0, world=1, seed=3)
    u.load_state_dict(state)
    assert [u.next_step() for _ in range(3)] == steps[3:]
    # Two ranks with accum 1 see exactly what one rank with accum 2 sees.
    r0 = SFTBatches(examples, 32, True, 0, micro_batch=2, accum=1, rank=0, world=2, seed=3)
    r1 = SFTBatches(examples, 32, True, 0, micro_batch=2, accum=1, rank=1, world=2, seed=3)
    assert [r0.next_step()[0], r1.next_step()[0]] == steps[0]
