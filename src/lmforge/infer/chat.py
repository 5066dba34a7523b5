"""Chat on top of the engine: render a conversation with the tokenizer's template, keep history.

The template is the Jinja text saved with the tokenizer (tokenizer_config.json /
chat_template.jinja), rendered the way transformers renders it (sandboxed Jinja, trim_blocks,
lstrip_blocks), so a conversation becomes the same tokens here, in `transformers` and in the
exported model. jinja2 comes with torch, so this adds no dependency.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

from torch import nn

from lmforge.errors import LmforgeError
from lmforge.infer.engine import Completion, complete_ids, context_length
from lmforge.infer.sampling import SamplingParams

ROLES = ("system", "user", "assistant")


@lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise LmforgeError(f"the tokenizer's chat_template is not valid Jinja: {e}") from None


def render_messages(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise LmforgeError("the tokenizer has no chat_template (tokenizer_config.json); cannot chat with it")
    from jinja2 import TemplateError

    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         eos_token="<|endoftext|>", bos_token="")
    except TemplateError as e:
        raise LmforgeError(f"chat_template failed to render: {e}") from None


def render_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """The ids a reply to `messages` is sampled after."""
    return tokenizer.encode(render_messages(tokenizer, messages))


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
            ids = self.tokenizer.encode(render_messages(self.tokenizer, self.messages))
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
