"""One entry point: `lmforge <command> [recipe.yaml] [key=value ...] [--flags]`.

Each command lives in the module that owns its stage (`module:function`, imported only when run,
so `lmforge --help` stays instant and torch is not imported for a config error). A command
function takes the remaining argv and returns an exit code.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import shutil
import sys
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal, NamedTuple

from lmforge import config as schema
from lmforge.errors import LmforgeError

# Keys a command reads, for its --help: a section ("train"), a single key ("data.sources"), or a
# per-stage train section ("sft.train"), which lists as one line pointing at `train`.
RUN_KEYS = ("run_dir", "seed", "device")
DATA_KEYS = ("data", "data.minhash", "data.filters")
PRETRAIN_KEYS = (*RUN_KEYS, "tokenizer", *DATA_KEYS, "model", "train")


class Command(NamedTuple):
    target: str  # module:function, imported only when the command runs
    summary: str
    keys: tuple[str, ...] = ()


COMMANDS: dict[str, Command] = {
    "quickstart": Command("lmforge.quickstart:cmd_quickstart", "tokenizer + tiny model on a corpus every machine has",
                          PRETRAIN_KEYS),
    "tokenizer": Command("lmforge.stages:cmd_tokenizer", "train a byte-level BPE tokenizer -> RUN/tokenizer",
                         ("run_dir", "tokenizer", "data.sources", "data.text_field", "model.max_seq_len",
                          "model.arch", "span.sentinels")),
    "prepare": Command("lmforge.stages:cmd_prepare", "tokenize a corpus into shards -> RUN/data/<split>",
                       ("run_dir", *DATA_KEYS)),
    "pretrain": Command("lmforge.stages:cmd_pretrain", "train a model on prepared shards -> RUN/checkpoints",
                        (*RUN_KEYS, "model", "model.moe", "span", "train", "parallel")),
    "sft": Command("lmforge.train.sft:cmd_sft", "supervised fine-tuning on chat examples (full or LoRA/QLoRA)",
                   (*RUN_KEYS, "sft", "sft.lora", "sft.train", "train", "parallel")),
    "seq2seq": Command("lmforge.train.seq2seq:cmd_seq2seq", "fine-tune a t5 model on source/target JSONL",
                       (*RUN_KEYS, "model", "seq2seq", "seq2seq.train", "train", "parallel")),
    "dpo": Command("lmforge.train.dpo:cmd_dpo", "direct preference optimisation on chosen/rejected pairs",
                   (*RUN_KEYS, "dpo", "dpo.lora", "dpo.train", "train", "parallel")),
    "rm": Command("lmforge.train.reward:cmd_rm", "train a reward model (Bradley-Terry) on preference pairs",
                  (*RUN_KEYS, "rm", "rm.train", "train", "parallel")),
    "grpo": Command("lmforge.train.grpo:cmd_grpo", "group relative policy optimisation with reward functions",
                    (*RUN_KEYS, "grpo", "grpo.lora", "grpo.train", "train", "parallel")),
    "merge": Command("lmforge.train.lora:cmd_merge", "merge a LoRA adapter into its base -> plain checkpoint"),
    "eval": Command("lmforge.eval.lm:cmd_eval",
                    "loss, bits-per-byte, benchmarks (eval.tasks), `eval compare|contamination|harness`",
                    ("run_dir", "device", "eval", "data.text_field", "generate.max_new_tokens")),
    "generate": Command("lmforge.infer.cli:cmd_generate", "sample text from a checkpoint",
                        ("run_dir", "device", "generate")),
    "chat": Command("lmforge.infer.cli:cmd_chat", "interactive terminal chat with a checkpoint",
                    ("run_dir", "device", "generate")),
    "serve": Command("lmforge.infer.server:cmd_serve", "OpenAI-compatible HTTP server with a web chat page",
                     ("run_dir", "device", "generate.checkpoint", "serve")),
    "export": Command("lmforge.export.cli:cmd_export", "`export hf|gguf CKPT OUT`: Hugging Face folder or GGUF file"),
    "import": Command("lmforge.export.cli:cmd_import", "`import hf PATH OUT`: a Llama/Qwen folder -> checkpoint"),
    "model": Command("lmforge.stages:cmd_model",
                     "`model info PRESET [--gpus N --gpu-mem M]`: parameters, FLOPs, memory per GPU by layout",
                     ("model", "model.moe")),
    "run": Command("lmforge.stages:cmd_run", "run the stages a recipe lists, in order, resumable",
                   ("run_dir", "seed", "device", "stages", "tokenizer", *DATA_KEYS, "model", "model.moe", "train",
                    "parallel", "eval",
                    "generate", "serve", "demo", "sft", "sft.lora", "sft.train", "dpo", "dpo.lora", "dpo.train",
                    "rm", "rm.train", "grpo", "grpo.lora", "grpo.train", "span", "seq2seq", "seq2seq.train")),
    "plot": Command("lmforge.plot:cmd_plot", "PNG + HTML of runs' curves: loss, bits/byte, lr, tokens/s, grad norm"),
    "monitor": Command("lmforge.monitor:cmd_monitor", "live view of a run: metrics, ETA, checkpoints, sample, alive?"),
    "doctor": Command("lmforge.doctor:cmd_doctor", "check this machine before a long run: GPU, compiler, disk, fit",
                      (*RUN_KEYS, "model", "train", "parallel")),
}


# --- help: the config keys a command reads, from the dataclasses themselves -------------------------

def type_name(tp: Any) -> str:
    """`int`, `list[str]`, or a Literal's choices as `a|b|c` (the empty choice shown as "")."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "|".join('""' if a == "" else str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return "|".join(type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is list:
        return f"list[{', '.join(type_name(a) for a in typing.get_args(tp))}]"
    return getattr(tp, "__name__", str(tp))


def show_value(value: Any) -> str:
    """A default as it would be typed on the command line (YAML): true, "", [a, b], 0.0003."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "[" + ", ".join(show_value(v) for v in value) + "]"
    if value == "":
        return '""'
    return str(value)


def config_keys(entries: tuple[str, ...], defaults: Any = None) -> dict[str, list[tuple[str, str, str, str]]]:
    """Section heading -> [(dotted key, type, default, description)] for the keys `entries` name.

    Defaults are read from `defaults` (a Config; the schema's own when None), so a command that
    starts from a recipe can show the recipe's values.
    """
    defaults = schema.Config() if defaults is None else defaults
    groups: dict[str, list[tuple[str, str, str, str]]] = {}
    for entry in entries:
        *path, name = entry.split(".")
        owner = defaults
        for part in path:
            owner = getattr(owner, part)
        hints = typing.get_type_hints(type(owner))
        if name not in hints:
            raise KeyError(f"{entry} is not a config key")
        tp, value = hints[name], getattr(owner, name)
        if tp is schema.StageTrain:
            groups.setdefault(entry, []).append(
                (f"{entry}.<key>", "", "", f"any train.<key> for this stage only (e.g. {entry}.lr=1e-4); "
                                           "unset ones follow the train section"))
        elif dataclasses.is_dataclass(tp):  # a whole section: its own keys (nested sections are listed apart)
            inner, docs, rows = typing.get_type_hints(tp), schema.field_docs(tp), groups.setdefault(entry, [])
            for f in dataclasses.fields(tp):
                if not dataclasses.is_dataclass(inner[f.name]):
                    rows.append((f"{entry}.{f.name}", type_name(inner[f.name]), show_value(getattr(value, f.name)),
                                 docs.get(f.name, "")))
        else:
            groups.setdefault(".".join(path) or "top-level", []).append(
                (entry, type_name(tp), show_value(value), schema.field_docs(type(owner)).get(name, "")))
    return groups


def keys_help(entries: tuple[str, ...], width: int = 0, defaults: Any = None, origin: str = "") -> str:
    """The epilog of a command's --help: `key: type = default  description`, grouped by section.

    width > 0 wraps descriptions to that many columns (a terminal); 0 keeps one line per key, so
    `lmforge pretrain --help | grep lr` finds a key with its description. `origin` names where
    `defaults` came from.
    """
    if not entries:
        return ""
    out = ["config keys (key=value after the command, or in a recipe.yaml"
           + (f"; defaults as {origin} sets them):" if origin else "):")]
    for heading, rows in config_keys(entries, defaults).items():
        out.append(f"\n{heading}:")
        heads = [f"  {key}: {tp} = {default}" if tp else f"  {key}" for key, tp, default, _ in rows]
        # The description column fits the section's ordinary keys; a longer one (a list default)
        # pushes only its own description along, or onto the next line.
        col = max((len(h) for h in heads if len(h) <= 48), default=48) + 2
        for head, (*_, doc) in zip(heads, rows):
            if not width:
                out.append(f"{head.ljust(col - 2)}  {doc}".rstrip())
                continue
            lines = textwrap.wrap(doc, max(width - col, 30), break_on_hyphens=False) or [""]
            if len(head) + 2 > col:
                out.append(head)
            else:
                out.append(head.ljust(col) + lines.pop(0))
            out.extend(" " * col + line for line in lines)
    return "\n".join(out)


class CommandParser(argparse.ArgumentParser):
    """An argparse parser whose --help ends with the config keys its command reads.

    The list is built only when help is asked for, so starting a command costs nothing extra.
    `recipe`: the YAML the command starts from, whose values the list shows as the defaults.
    """

    def __init__(self, name: str, description: str, recipe: str | Path | None = None, **kwargs: Any):
        super().__init__(prog=f"lmforge {name}", description=description, **kwargs)
        self.keys = COMMANDS[name].keys if name in COMMANDS else ()
        self.recipe = recipe

    def format_help(self) -> str:
        width = shutil.get_terminal_size().columns if sys.stdout.isatty() else 0
        defaults = schema.load_config(self.recipe) if self.recipe else None
        keys = keys_help(self.keys, width, defaults, Path(self.recipe).name if self.recipe else "")
        return super().format_help() + (f"\n{keys}\n" if keys else "")


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("items", nargs="*", metavar="[recipe.yaml] key=value",
                        help="an optional YAML recipe, then dotted overrides such as train.lr=1e-3")


def parse_config(prog: str, argv: list[str], description: str):
    """The Config of a command that takes only `[recipe.yaml] key=value ...` (most stages)."""
    p = CommandParser(prog, description)
    add_config_args(p)
    return config_from_args(p.parse_args(argv).items)


def config_from_args(items: list[str]):
    """Split `[recipe.yaml] key=value ...` and build the Config."""
    from lmforge.config import load_config

    recipe = None
    overrides = []
    for item in items:
        if "=" in item:
            overrides.append(item)
        elif recipe is None and (item.endswith((".yaml", ".yml")) or Path(item).is_file()):
            recipe = item
        else:
            raise LmforgeError(f"unexpected argument '{item}': give one recipe.yaml and key=value overrides")
    keys = {o.split("=", 1)[0].strip() for o in overrides}
    remembered = False
    if recipe is None:
        # A run directory remembers its resolved config, so `lmforge pretrain run_dir=X` (or eval,
        # generate...) continues run X with the settings it was started with.
        run_dir = next((o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].strip() == "run_dir"), None)
        saved = Path(run_dir) / "lmforge.yaml" if run_dir else None
        if saved is not None and saved.is_file():
            recipe, remembered = str(saved), True
    if remembered and "model.preset" in keys:
        cfg = _with_new_model(recipe, overrides)
    else:
        cfg = load_config(recipe, overrides)
    if remembered and cfg.train.resume == "none" and "train.resume" not in keys:
        # Older versions saved a fresh start into the run's config, so every restart started afresh
        # again; a fresh start is asked for on the command line, never inherited.
        cfg.train.resume = "auto"
    if remembered:
        given = [o for o in overrides if o.split("=", 1)[0].strip().startswith("parallel.")]
        if given:
            _replace_remembered_layout(cfg, recipe, given)
        else:
            _fit_remembered_layout(cfg, recipe)
    return cfg


def _with_new_model(saved: str, overrides: list[str]):
    """`model.preset=X` on a run that remembers its model replaces the remembered model section whole.

    The remembered config holds every resolved model key (n_layer, n_embd, ...), and explicit keys win
    over a preset, so merging would keep the old model and silently ignore the preset. The other
    sections (data, train, ...) are still remembered; a checkpoint of the old model then refuses to
    resume into the new one, with the way out named.
    """
    from lmforge.config import load_config

    base = load_config(saved, [])
    old = base.model
    base.model = schema.ModelConfig()
    cfg = load_config(None, overrides, base=base)
    if cfg.model != old:
        from lmforge.console import log

        log(f"{saved} remembers another model; this launch takes model.preset={cfg.model.preset} and the "
            "model.* keys given")
    return cfg


def _sizes(pc: schema.ParallelConfig) -> str:
    named = [f"{k} {getattr(pc, k)}" for k in ("pp", "dp_replicate", "dp_shard", "cp", "tp") if getattr(pc, k) > 1]
    return ", ".join(named) or "the default: data parallel over every process"


def _fit_remembered_layout(cfg: schema.Config, saved: str) -> None:
    """A run remembers its layout, so a restart on as many processes keeps it; a restart on another number
    (a tp=2 run resumed on one process) takes the default layout instead of refusing to start. The
    checkpoint is resharded on load either way."""
    from lmforge.train.parallelize import resolve_sizes  # imports torch: only on this path

    try:
        resolve_sizes(cfg.parallel, int(os.environ.get("WORLD_SIZE", "1")))
    except LmforgeError:
        from lmforge.console import log

        log(f"{saved} remembers the layout {_sizes(cfg.parallel)}, which does not fit "
            f"{os.environ.get('WORLD_SIZE', '1')} process(es): this launch uses the default "
            "(parallel.dp_shard=-1); give parallel.* keys to choose another")
        cfg.parallel = schema.ParallelConfig()


def _replace_remembered_layout(cfg: schema.Config, saved: str, given: list[str]) -> None:
    """parallel.* keys on the command line replace the remembered layout whole: `parallel.pp=2` on a run that
    remembers pp 2 x dp_shard 2 means one pipeline on this launch, not pp 2 merged with a dp_shard 2 that
    no longer fits. The keys not given take their defaults."""
    merged = cfg.parallel
    cfg.parallel = schema.ParallelConfig()
    for item in given:
        key, value = item.split("=", 1)
        schema.set_key(cfg, key.strip(), value.strip())
    if cfg.parallel != merged:
        from lmforge.console import log

        log(f"{saved} remembers another parallel section; this launch takes the parallel.* keys given and the "
            f"defaults for the rest (layout: {_sizes(cfg.parallel)})")


def _run(name: str, argv: list[str]) -> int:
    module, func = COMMANDS[name].target.split(":")
    return int(getattr(importlib.import_module(module), func)(argv) or 0)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        width = max(len(n) for n in COMMANDS)
        lines = [f"  {n.ljust(width)}  {c.summary}" for n, c in COMMANDS.items()]
        print("usage: lmforge <command> [recipe.yaml] [key=value ...]\n\ncommands:\n" + "\n".join(lines)
              + "\n\n`lmforge <command> --help` shows a command's options and the config keys it reads.")
        sys.exit(0 if argv else 2)
    if argv[0] in ("-V", "--version"):
        from lmforge import __version__

        print(f"lmforge {__version__}")
        sys.exit(0)
    name = argv[0]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, list(COMMANDS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        print(f"lmforge: unknown command '{name}'{hint}; see `lmforge --help`", file=sys.stderr)
        sys.exit(2)
    try:
        code = _run(name, argv[1:])
    except LmforgeError as e:
        print(f"lmforge {name}: error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print(f"\nlmforge {name}: interrupted", file=sys.stderr)
        code = 130
    except OSError as e:
        # Disk full and permission errors are the user's to fix; show them plainly.
        if os.environ.get("LMFORGE_DEBUG"):
            raise
        print(f"lmforge {name}: error: {e}", file=sys.stderr)
        code = 1
    sys.exit(code)
