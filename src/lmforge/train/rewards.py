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
import os
import re
import sys
import traceback
import types
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
    """`package.module:function` or `path/to/file.py:function`.

    A module is looked up from the current directory too (as `python -m` does; the `lmforge` script
    would not), and one that fails to import is reported with its exception and its own line, not a
    traceback through lmforge.
    """
    module_name, _, func = spec.rpartition(":")
    if not module_name or not func:
        raise LmforgeError(f"grpo.rewards: '{spec}' is not a built-in ({', '.join(BUILTIN)}, model) "
                           "nor module:function")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise LmforgeError(f"grpo.rewards: '{spec}': file {path} not found")
        module = _import(spec, module_name, lambda: _exec_file(path))
    else:
        module = _import(spec, module_name, lambda: _import_from_cwd(module_name))
    fn = getattr(module, func, None)
    if not callable(fn):
        found = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                 and getattr(v, "__module__", None) == module.__name__]
        raise LmforgeError(f"grpo.rewards: '{module_name}' has no function '{func}'"
                           + (f" (it defines {', '.join(found[:8])})" if found else ""))
    return fn


def _exec_file(path: Path) -> types.ModuleType:
    # Registered in sys.modules while it runs, as `import` does: dataclasses and pickling look there.
    name = f"lmforge_reward_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _import_from_cwd(name: str) -> types.ModuleType:
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.append(cwd)
    try:
        return importlib.import_module(name)
    finally:
        if added:
            sys.path.remove(cwd)


def _import(spec: str, module_name: str, load: Callable[[], types.ModuleType]) -> types.ModuleType:
    """load(), with any failure turned into an LmforgeError naming the module, the exception and its line."""
    try:
        return load()
    except ModuleNotFoundError as e:
        if e.name == module_name or module_name.startswith(f"{e.name}."):  # it, or its package, is missing
            raise LmforgeError(f"grpo.rewards: '{spec}': no module named '{e.name}' (looked in the current "
                               "directory and the installed packages; a file is given as path/to/file.py:function)"
                               ) from None
        raise LmforgeError(f"grpo.rewards: importing '{module_name}' failed{_where(e)}: "
                           f"ModuleNotFoundError: {e}") from None
    except (Exception, SystemExit) as e:  # whatever the module's own code raised while it ran
        raise LmforgeError(f"grpo.rewards: importing '{module_name}' failed{_where(e)}: "
                           f"{type(e).__name__}: {e}") from None


def _where(e: BaseException) -> str:
    """' at FILE:LINE' in the module whose import raised (or of a syntax error).

    That module is the deepest frame running module-level code; within its file, the deepest line
    (a helper of the module that raised is more precise than the call at module level).
    """
    if isinstance(e, SyntaxError) and e.filename:
        return f" at {e.filename}:{e.lineno}"
    frames = [f for f in traceback.extract_tb(e.__traceback__) if not f.filename.startswith("<")]
    modules = [f.filename for f in frames if f.name == "<module>"]
    if not modules:
        return ""
    line = [f for f in frames if f.filename == modules[-1]][-1]
    return f" at {line.filename}:{line.lineno}"


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
