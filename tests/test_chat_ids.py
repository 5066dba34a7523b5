"""One conversation, one list of ids: training (SFT), `chat` (ChatSession), `serve` (the request parser),
the prompt renderer of GRPO/eval and transformers' `apply_chat_template(..., tokenize=True)` agree
token for token, over randomized conversations, and the loss mask follows the replies' characters."""

from __future__ import annotations

import random

import pytest
from infer_helpers import make_model, make_tokenizer

from lmforge.data.chat import Record, chat_text, render_conversation
from lmforge.errors import LmforgeError
from lmforge.infer.chat import ChatSession
from lmforge.infer.openai_api import parse_request
from lmforge.infer.sampling import SamplingParams
from lmforge.model.loss import IGNORE
from lmforge.tokenizer import render_chat
from lmforge.train.sft import encode_sft

PIECES = ["你好", "机器学习是人工智能的一个分支。", "def add(a, b):\n    return a + b\n", "Hello world!", " ", "\n",
          "\n\n", "  indented", "print(add(1, 2))", "The quick brown fox.", "答案是 95。", "\t", "😀", "x = [1, 2]\n"]


def random_text(rng: random.Random) -> str:
    if rng.random() < 0.12:
        return ""  # empty contents happen (an empty system prompt, an empty reply)
    text = "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 5)))
    if rng.random() < 0.3:
        text = "\n" * rng.randint(1, 2) + text  # a leading newline merges with the template's "\n"
    if rng.random() < 0.3:
        text += "\n" * rng.randint(1, 2)
    return text


def random_conversation(rng: random.Random) -> list[dict]:
    msgs = [{"role": "system", "content": random_text(rng)}] if rng.random() < 0.5 else []
    for _ in range(rng.randint(1, 3)):
        msgs += [{"role": "user", "content": random_text(rng)}, {"role": "assistant", "content": random_text(rng)}]
    return msgs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tok")
    tok = make_tokenizer(folder)
    assert len(tok.encode("\n\n")) == 1  # the merge that makes per-turn encoding differ
    return tok, AutoTokenizer.from_pretrained(str(folder)), make_model(tok.vocab_size, max_seq_len=2048)


def hf_ids(hf, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    out = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_every_path_gives_the_ids_transformers_gives(setup):
    tok, hf, model = setup
    rng = random.Random(1234)
    for n in range(150):
        conv = random_conversation(rng)
        want = hf_ids(hf, conv, False)
        ids, mask = render_conversation(tok, conv)
        assert ids == want, conv
        (inputs, targets), = encode_sft(tok, [Record({"messages": conv}, f"conv{n}")], seq_len=4096)
        assert inputs == want[:-1]  # what SFT trains on
        assert [t for t in targets if t != IGNORE] == [t for t, m in zip(want[1:], mask[1:]) if m]
        prompt = conv[:-1]  # ends with the user's turn: what chat, serve, GRPO and eval sample after
        want = hf_ids(hf, prompt, True)
        assert render_conversation(tok, prompt, add_generation_prompt=True)[0] == want, prompt
        session = ChatSession(model, tok, SamplingParams(max_new_tokens=4))
        session.messages = [dict(m) for m in prompt]
        assert session.prompt_ids() == want, prompt
        req = parse_request({"messages": prompt}, chat=True, tokenizer=tok, context=4096, max_tokens_limit=16)
        assert req.prompts == [want], prompt


def test_the_mask_covers_each_reply_and_its_end_token(setup):
    tok, _, _ = setup
    rng = random.Random(99)
    for _ in range(150):
        conv = random_conversation(rng)
        text, spans = chat_text(tok, conv)
        assert text == render_chat(conv)
        assert [text[a:b] for a, b in spans] == [m["content"] + "<|im_end|>" for m in conv if m["role"] == "assistant"]
        ids, mask = render_conversation(tok, conv)
        _, offsets = tok.encode_with_offsets(text)
        covered = set()
        for (a, b), m in zip(offsets, mask):
            inside = any(a < e and b > s for s, e in spans)
            assert m == int(inside)  # learned exactly when the token holds reply characters
            if m:
                covered.update(range(a, b))
        assert all(set(range(s, e)) <= covered for s, e in spans)  # every reply character is a target
        assert sum(ids[i] == tok.im_end_id for i in range(len(ids)) if mask[i]) == len(spans)


def test_a_reply_starting_with_a_newline_learns_the_shared_token(setup):
    tok, hf, _ = setup
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\nok"}]
    ids, mask = render_conversation(tok, conv)
    assert ids == hf_ids(hf, conv, False)
    shared = tok.encode("\n\n")[0]
    i = ids.index(shared)  # "assistant" "\n\n" "ok": the template's "\n" and the reply's, one token
    assert ids[i - 1] == tok.encode("assistant")[-1] and mask[i] == 1 and mask[i - 1] == 0
    assert tok.decode([t for t, m in zip(ids, mask) if m]) == "\n\nok<|im_end|>"
    # per-turn encoding, the old way, would have trained on ids the served model never sees
    assert ids != [tok.im_start_id, *tok.encode("user\nhi"), tok.im_end_id, *tok.encode("\n"), tok.im_start_id,
                   *tok.encode("assistant\n"), *tok.encode("\nok"), tok.im_end_id, *tok.encode("\n")]


def test_a_custom_template_is_rendered_and_masked_too(setup):
    """A tokenizer whose chat_template is not ChatML (an imported model's, say): ids still equal
    transformers', and the mask is the reply plus the special token that closes it."""
    tok, _, _ = setup
    template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + ': ' + m['content'] + '<|endoftext|>' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant: ' }}{% endif %}")
    custom = type(tok)(tok.tok, template)
    conv = [{"role": "user", "content": "机器学习?"}, {"role": "assistant", "content": "是的。"}]
    text, spans = chat_text(custom, conv)
    assert text == "<|im_start|>user: 机器学习?<|endoftext|><|im_start|>assistant: 是的。<|endoftext|>"
    assert [text[a:b] for a, b in spans] == ["是的。<|endoftext|>"]
    ids, mask = render_conversation(custom, conv)
    assert ids == custom.encode(text)
    assert custom.decode([t for t, m in zip(ids, mask) if m]) == "是的。<|endoftext|>"
    broken = type(tok)(tok.tok, "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}")
    with pytest.raises(LmforgeError, match=r"x.jsonl:3: .*does not render messages\[1\]"):
        render_conversation(broken, [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                            where="x.jsonl:3")
