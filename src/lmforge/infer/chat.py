"""Chat on top of the engine: render a conversation to ids, keep history.

The ids come from `render_conversation` (data/chat.py), the renderer SFT, DPO, GRPO and eval use:
the tokenizer's chat template rendered to text (as transformers renders it) and encoded whole, so
a conversation becomes the same tokens here, in training, in `transformers` and in the exported
model.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from lmforge.data.chat import render_conversation
from lmforge.errors import LmforgeError
from lmforge.infer.engine import Completion, complete_ids, context_length
from lmforge.infer.sampling import SamplingParams

ROLES = ("system", "user", "assistant")


def render_messages(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The conversation as text (what `render_prompt` encodes), for display and tests."""
    return tokenizer.render_chat(messages, add_generation_prompt)


def render_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """The ids a reply to `messages` is sampled after."""
    return render_conversation(tokenizer, messages, add_generation_prompt=True)[0]


def check_messages(messages: object) -> list[dict]:
    """Validate a list of {role, content} messages (the server passes user input straight here)."""
    if not isinstance(messages, list) or not messages:
        raise LmforgeError("'messages' must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise LmforgeError(f"messages[{i}]: needs 'role' (one of {', '.join(ROLES)}) and 'content'")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI's content parts: keep the text ones
            parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            if len(parts) != len(content) or not all(isinstance(p, str) for p in parts):
                raise LmforgeError(f"messages[{i}].content: only text parts are supported")
            content = "".join(parts)
        if not isinstance(content, str):
            raise LmforgeError(f"messages[{i}].content must be a string")
        out.append({"role": m["role"], "content": content})
    return out


class ChatSession:
    """A conversation with history. Oldest turns are dropped (the system prompt is kept) when the
    rendered prompt would not leave room for a reply."""

    def __init__(self, model: nn.Module, tokenizer, params: SamplingParams, system: str | None = None):
        self.model, self.tokenizer, self.params = model, tokenizer, params
        self.system = system
        self.messages: list[dict] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def prompt_ids(self) -> list[int]:
        ctx = context_length(self.model)
        reserve = max(1, min(self.params.max_new_tokens, ctx // 4))
        first = 1 if self.system else 0
        while True:
            ids = render_prompt(self.tokenizer, self.messages)
            if len(ids) + reserve <= ctx:
                return ids
            if len(self.messages) - first <= 1:
                raise LmforgeError(f"the message is too long: {len(ids)} tokens, and the model's context "
                                   f"is {ctx} (with {reserve} kept free for the reply)")
            del self.messages[first]  # forget the oldest turn

    def send(self, text: str, on_text: Callable[[str], None] | None = None) -> Completion:
        self.messages.append({"role": "user", "content": text})
        try:
            ids = self.prompt_ids()
        except LmforgeError:
            self.messages.pop()
            raise
        (reply,) = complete_ids(self.model, self.tokenizer, [ids], self.params,
                                on_text=(lambda _row, delta: on_text(delta)) if on_text else None)
        self.messages.append({"role": "assistant", "content": reply.text})
        return reply
