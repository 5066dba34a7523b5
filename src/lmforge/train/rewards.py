"""Reward functions for GRPO: built-in checks, a user's `module:function`, or a trained reward model.

A reward function takes the batch's completions (text) and their examples (the records of the
prompt file, e.g. with an "answer" field) and returns one float per completion:

    def my_reward(completions: list[str], examples: list[dict], **info) -> list[float]

`info` carries `prompts` (message lists), `lengths` (completion tokens), `truncated` (hit
max_new_tokens) and `max_new_tokens`; a function without **kwargs is called without it.
Several rewards combine as a weighted sum (`grpo.rewards`, `grpo.reward_weights`).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
from collections.abc import Callable
from pathlib import Path

from lmforge.errors import LmforgeError

RewardFn = Callable[..., list[float]]
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
# The demo's answer sentences, English and Chinese, and nothing else.
ANSWER_FORMAT = re.compile(r"(The answer is -?\d+\.|答案是 ?-?\d+。)")


def extract_number(text: str) -> str | None:
    """The last number in `text` (thousands separators dropped), or None."""
    found = NUMBER.findall(text)
    return found[-1].replace(",", "") if found else None


def same_number(a: str | None, b: object) -> bool:
    if a is None:
        return False
    try:
        return float(a) == float(str(b).replace(",", ""))
    except ValueError:
        return False


def exact_match(completions: list[str], examples: list[dict], **info) -> list[float]:
    """1 if the last number of the completion equals the example's "answer" (numerically), else 0."""
    return [float(same_number(extract_number(c), ex["answer"])) for c, ex in zip(completions, examples)]


def format_reward(completions: list[str], examples: list[dict], **info) -> list[float]:
    """1 if the completion ends in its one answer sentence ("The answer is N." / "答案是 N。"), with any
    working before it: the answer is where a reader (and exact_match) looks for it, and stated once."""
    out = []
    for c in completions:
        c = c.strip()
        found = ANSWER_FORMAT.findall(c)
        out.append(float(len(found) == 1 and c.endswith(found[0])))
    return out


def length_reward(completions: list[str], examples: list[dict], *, lengths: list[int], max_new_tokens: int,
                  **info) -> list[float]:
    """DAPO's soft overlong penalty: 0 up to 3/4 of max_new_tokens, then linearly down to -1 at the limit."""
    free = 0.75 * max_new_tokens
    return [0.0 if n <= free else -min(1.0, (n - free) / max(max_new_tokens - free, 1)) for n in lengths]


BUILTIN: dict[str, RewardFn] = {"exact_match": exact_match, "format": format_reward, "length": length_reward}
NEEDS_FIELD = {"exact_match": "answer"}


def load_function(spec: str) -> RewardFn:
    """`package.module:function` or `path/to/file.py:function`."""
    module_name, _, func = spec.rpartition(":")
    if not module_name or not func:
        raise LmforgeError(f"grpo.rewards: '{spec}' is not a built-in ({', '.join(BUILTIN)}, model) "
                           "nor module:function")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise LmforgeError(f"grpo.rewards: '{spec}': file {path} not found")
            s = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(s)
            s.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as e:
        raise LmforgeError(f"grpo.rewards: cannot import '{module_name}' ({e})") from None
    fn = getattr(module, func, None)
    if not callable(fn):
        raise LmforgeError(f"grpo.rewards: '{module_name}' has no function '{func}'")
    return fn


def _call(fn: RewardFn, name: str, completions: list[str], examples: list[dict], info: dict) -> list[float]:
    params = inspect.signature(fn).parameters.values()
    takes_info = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params)
    out = fn(completions, examples, **info) if takes_info else fn(completions, examples)
    try:
        values = [float(v) for v in out]
    except (TypeError, ValueError):
        raise LmforgeError(f"reward '{name}' must return a list of numbers, got {out!r:.80}") from None
    if len(values) != len(completions):
        raise LmforgeError(f"reward '{name}' returned {len(values)} values for {len(completions)} completions")
    return values


class Rewards:
    """The weighted sum of the configured reward functions; also reports each one's mean."""

    def __init__(self, names: list[str], weights: list[float], model_reward: RewardFn | None = None):
        if not names:
            raise LmforgeError("grpo.rewards is empty: name at least one reward (e.g. exact_match)")
        if weights and len(weights) != len(names):
            raise LmforgeError(f"grpo.reward_weights has {len(weights)} values for {len(names)} grpo.rewards")
        self.names = names
        self.weights = list(weights) or [1.0] * len(names)
        self.fns: list[RewardFn] = []
        for n in names:
            if n in BUILTIN:
                self.fns.append(BUILTIN[n])
            elif n == "model":
                if model_reward is None:
                    raise LmforgeError("grpo.rewards names 'model' but grpo.reward_model is not set")
                self.fns.append(model_reward)
            else:
                self.fns.append(load_function(n))

    def check(self, records) -> None:
        """Fail before training when a record lacks a field a built-in reward needs."""
        for n in self.names:
            field = NEEDS_FIELD.get(n)
            for r in records if field else []:
                if field not in r.data:
                    raise LmforgeError(f"{r.where}: no '{field}' field, which the '{n}' reward needs")

    def __call__(self, completions: list[str], examples: list[dict], **info) -> tuple[list[float], dict]:
        total = [0.0] * len(completions)
        parts = {}
        for name, w, fn in zip(self.names, self.weights, self.fns):
            values = _call(fn, name, completions, examples, info)
            parts[f"reward/{name}"] = sum(values) / max(len(values), 1)
            total = [t + w * v for t, v in zip(total, values)]
        return total, parts
