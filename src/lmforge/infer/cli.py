"""`lmforge generate` and `lmforge chat`: sample from a checkpoint in the terminal, streaming.

    lmforge generate CKPT_OR_RUN_DIR --prompt "Once upon a time" [--prompt ...] [--file prompts.txt]
    lmforge generate recipe.yaml generate.temperature=0.5 --prompt ...   (run_dir from the recipe)
    lmforge chat CKPT_OR_RUN_DIR [--system "You are ..."]

Flags win over the recipe's `generate:` section, which wins over the defaults. Completions go to
stdout (plain text, pipe-friendly); notes and errors go to stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from lmforge.cli import CommandParser
from lmforge.errors import LmforgeError

if TYPE_CHECKING:
    from lmforge.infer.sampling import SamplingParams


def add_sampling_args(ap: argparse.ArgumentParser, max_new_tokens: int | None = None) -> None:
    ap.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    ap.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=None, help="0 = off")
    ap.add_argument("--top-p", type=float, default=None, help="1 = off")
    ap.add_argument("--repetition-penalty", type=float, default=None, help="1 = off")
    ap.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    ap.add_argument("--seed", type=int, default=None)
    add_model_args(ap)


def add_model_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--quantize", choices=["int8", "int4"], default=None, help="weight-only quantization")
    ap.add_argument("--device", default=None, help="auto (CUDA if available), cpu, cuda, cuda:N")
    ap.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16")


def split_items(items: list[str]):
    """(the checkpoint folder meant, Config from the recipe and key=value items).

    The checkpoint is the positional one (a checkpoint, run or stage folder, or a stage name of the
    run), else `generate.checkpoint`, else the run's latest pretraining checkpoint.
    """
    from lmforge.checkpoint import resolve_checkpoint
    from lmforge.cli import config_from_args

    target = None
    rest = []
    for item in items:
        path = Path(item)
        if "=" not in item and (path.is_dir() or not (path.is_file() or item.endswith((".yaml", ".yml")))):
            if target is not None:
                raise LmforgeError(f"two checkpoints given ('{target}' and '{item}'); give one")
            target = item
        else:
            rest.append(item)
    cfg = config_from_args(rest)
    if target is not None:
        return resolve_checkpoint(target, cfg.run_dir), cfg
    if cfg.generate.checkpoint:
        return resolve_checkpoint(cfg.generate.checkpoint, cfg.run_dir, "generate.checkpoint"), cfg
    return resolve_checkpoint(cfg.run_dir), cfg  # its errors then speak of the run folder


def sampling_params(args: argparse.Namespace, gen) -> SamplingParams:
    from lmforge.infer.sampling import SamplingParams

    pick = lambda flag, default: default if flag is None else flag
    params = SamplingParams(
        max_new_tokens=pick(args.max_new_tokens, gen.max_new_tokens),
        temperature=pick(args.temperature, gen.temperature),
        top_k=pick(args.top_k, gen.top_k),
        top_p=pick(args.top_p, gen.top_p),
        repetition_penalty=pick(args.repetition_penalty, gen.repetition_penalty),
        stop=pick(args.stop, list(gen.stop)),
        seed=pick(args.seed, gen.seed),
    )
    params.check()
    return params


def read_prompts(args: argparse.Namespace, gen) -> list[str]:
    prompts = list(args.prompt or [])
    if args.file:
        path = Path(args.file)
        if not path.is_file():
            raise LmforgeError(f"--file {path}: no such file")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise LmforgeError(f"--file {path}: not UTF-8 text ({e})") from None
        prompts += [line for line in lines if line.strip()]
    if not prompts:
        prompts = list(gen.prompts)
    return prompts or [""]  # nothing given: one unconditional sample


def _out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def cmd_generate(argv: list[str]) -> int:
    ap = CommandParser("generate", "Sample text from a checkpoint.")
    ap.add_argument("items", nargs="*", metavar="CKPT_OR_RUN_DIR | recipe.yaml | key=value")
    ap.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    ap.add_argument("--file", help="a text file with one prompt per line")
    ap.add_argument("--no-stream", action="store_true", help="print each completion when it is done")
    ap.add_argument("--batch-size", type=int, default=8, help="prompts per batch with --no-stream")
    add_sampling_args(ap)
    args = ap.parse_intermixed_args(argv)
    target, cfg = split_items(args.items)
    params = sampling_params(args, cfg.generate)
    prompts = read_prompts(args, cfg.generate)

    from lmforge.infer.engine import complete
    from lmforge.infer.loading import load_for_inference

    model, tokenizer, ckpt = load_for_inference(target, args.device or cfg.device, args.dtype, args.quantize)
    print(f"lmforge generate: {ckpt} on {next(model.parameters()).device}"
          + (f", {args.quantize}" if args.quantize else ""), file=sys.stderr)
    from lmforge.infer.engine import check_prompts, encode_prompt, is_encoder_decoder

    encoder = is_encoder_decoder(model)
    check_prompts(model, [encode_prompt(tokenizer, p, encoder) for p in prompts])  # fail before printing anything
    stream = cfg.generate.stream and not args.no_stream
    # An encoder-decoder's output does not continue its input: the two are shown apart.
    sep = " -> " if getattr(model, "is_encoder_decoder", False) else ""
    if stream:
        for i, prompt in enumerate(prompts):
            _out(("\n" if i else "") + prompt + sep)
            complete(model, tokenizer, [prompt], params, on_text=lambda _row, delta: _out(delta))
            _out("\n")
    else:
        for start in range(0, len(prompts), max(1, args.batch_size)):
            batch = prompts[start:start + max(1, args.batch_size)]
            for j, c in enumerate(complete(model, tokenizer, batch, params)):
                _out(("\n" if start + j else "") + batch[j] + sep + c.text + "\n")
    return 0


HELP = "/reset clears the history, /exit quits"


def cmd_chat(argv: list[str]) -> int:
    ap = CommandParser("chat", f"Chat with a checkpoint ({HELP}).")
    ap.add_argument("items", nargs="*", metavar="CKPT_OR_RUN_DIR | recipe.yaml | key=value")
    ap.add_argument("--system", default=None, help="system prompt")
    add_sampling_args(ap, max_new_tokens=512)
    args = ap.parse_intermixed_args(argv)
    target, cfg = split_items(args.items)
    params = sampling_params(args, cfg.generate)

    from lmforge.infer.chat import ChatSession
    from lmforge.infer.loading import load_for_inference

    model, tokenizer, ckpt = load_for_inference(target, args.device or cfg.device, args.dtype, args.quantize)
    if getattr(model, "is_encoder_decoder", False):
        raise LmforgeError(f"{ckpt} is an encoder-decoder (model.arch=t5) with no chat template: use "
                           "`lmforge generate` with its source text")
    session = ChatSession(model, tokenizer, params, system=args.system)
    interactive = sys.stdin.isatty()
    print(f"lmforge chat: {ckpt}; {HELP}", file=sys.stderr)
    while True:
        try:
            line = input("> ") if interactive else sys.stdin.readline()
        except EOFError:
            line = ""
        if not line:  # end of input
            if interactive:
                print(file=sys.stderr)
            return 0
        text = line.rstrip("\n")
        command = text.strip().lower()
        if command in ("/exit", "/quit"):
            return 0
        if command == "/reset":
            session.reset()
            print("(history cleared)", file=sys.stderr)
            continue
        if not text.strip():
            continue
        try:
            session.send(text, on_text=_out)
        except LmforgeError as e:
            print(f"\nlmforge chat: {e}", file=sys.stderr)
        _out("\n")
