"""One entry point: `lmforge <command> [recipe.yaml] [key=value ...] [--flags]`.

Each command lives in the module that owns its stage (`module:function`, imported only when run,
so `lmforge --help` stays instant and torch is not imported for a config error). A command
function takes the remaining argv and returns an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from lmforge.errors import LmforgeError

COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": ("lmforge.quickstart:cmd_quickstart", "tokenizer + tiny model on a corpus every machine has"),
    "tokenizer": ("lmforge.stages:cmd_tokenizer", "train a byte-level BPE tokenizer -> RUN/tokenizer"),
    "prepare": ("lmforge.stages:cmd_prepare", "tokenize a corpus into shards -> RUN/data/<split>"),
    "pretrain": ("lmforge.stages:cmd_pretrain", "train a model on prepared shards -> RUN/checkpoints"),
    "sft": ("lmforge.train.sft:cmd_sft", "supervised fine-tuning on chat examples (full or LoRA/QLoRA)"),
    "dpo": ("lmforge.train.dpo:cmd_dpo", "direct preference optimisation on chosen/rejected pairs"),
    "rm": ("lmforge.train.reward:cmd_rm", "train a reward model (Bradley-Terry) on preference pairs"),
    "grpo": ("lmforge.train.grpo:cmd_grpo", "group relative policy optimisation with reward functions"),
    "merge": ("lmforge.train.lora:cmd_merge", "merge a LoRA adapter into its base -> plain checkpoint"),
    "eval": ("lmforge.eval.lm:cmd_eval", "loss, perplexity, bits-per-byte of a checkpoint"),
    "generate": ("lmforge.infer.cli:cmd_generate", "sample text from a checkpoint"),
    "chat": ("lmforge.infer.cli:cmd_chat", "interactive terminal chat with a checkpoint"),
    "serve": ("lmforge.infer.server:cmd_serve", "OpenAI-compatible HTTP server with a web chat page"),
    "export": ("lmforge.export.cli:cmd_export", "`export hf|gguf CKPT OUT`: Hugging Face folder or GGUF file"),
    "import": ("lmforge.export.cli:cmd_import", "`import hf PATH OUT`: a Llama/Qwen folder -> checkpoint"),
    "model": ("lmforge.stages:cmd_model", "`model info PRESET`: parameters, FLOPs, training memory"),
    "run": ("lmforge.stages:cmd_run", "run the stages a recipe lists, in order, resumable"),
}


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("items", nargs="*", metavar="[recipe.yaml] key=value",
                        help="an optional YAML recipe, then dotted overrides such as train.lr=1e-3")


def parse_config(prog: str, argv: list[str], description: str):
    """The Config of a command that takes only `[recipe.yaml] key=value ...` (most stages)."""
    p = argparse.ArgumentParser(prog=f"lmforge {prog}", description=description)
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
    cfg = load_config(recipe, overrides)
    if remembered and cfg.train.resume == "none" and "train.resume" not in keys:
        # Older versions saved a fresh start into the run's config, so every restart started afresh
        # again; a fresh start is asked for on the command line, never inherited.
        cfg.train.resume = "auto"
    return cfg


def _run(name: str, argv: list[str]) -> int:
    target, _ = COMMANDS[name]
    module, func = target.split(":")
    return int(getattr(importlib.import_module(module), func)(argv) or 0)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        width = max(len(n) for n in COMMANDS)
        lines = [f"  {n.ljust(width)}  {h}" for n, (_, h) in COMMANDS.items()]
        print("usage: lmforge <command> [recipe.yaml] [key=value ...]\n\ncommands:\n" + "\n".join(lines)
              + "\n\n`lmforge <command> --help` shows a command's options.")
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
