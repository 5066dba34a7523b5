"""`lmforge export hf|gguf CKPT OUT` and `lmforge import hf PATH OUT`.

CKPT may be a checkpoint folder, a run folder or a stage folder (its latest checkpoint is used);
a LoRA / QLoRA checkpoint is exported merged, or as a PEFT folder with `export hf --adapter`.
"""

from __future__ import annotations

import argparse
import json
import sys

from lmforge.errors import LmforgeError


def cmd_export(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="lmforge export", description="Export a checkpoint.")
    sub = ap.add_subparsers(dest="format", required=True)
    hf = sub.add_parser("hf", help="a Hugging Face folder that transformers loads (no custom code)")
    hf.add_argument("ckpt", metavar="CKPT_OR_RUN_DIR")
    hf.add_argument("out", metavar="OUT_DIR")
    hf.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="weights on disk")
    hf.add_argument("--adapter", action="store_true", help="a LoRA checkpoint as a PEFT folder (adapters + OUT/base) "
                    "instead of the merged model")
    gg = sub.add_parser("gguf", help="one GGUF file for llama.cpp")
    gg.add_argument("ckpt", metavar="CKPT_OR_RUN_DIR")
    gg.add_argument("out", metavar="OUT.gguf")
    gg.add_argument("--type", default="f16", choices=["f16", "q8_0", "q4_0"], help="matrix storage type")
    args = ap.parse_args(argv)

    from lmforge.checkpoint import resolve_checkpoint

    ckpt = resolve_checkpoint(args.ckpt)
    if args.format == "hf":
        from lmforge.export.hf import export_hf

        out = export_hf(ckpt, args.out, dtype=args.dtype, adapter=args.adapter)
        loader = "peft.AutoPeftModelForCausalLM" if args.adapter else "transformers.AutoModelForCausalLM"
        if not args.adapter and json.loads((out / "config.json").read_text(encoding="utf-8")).get(
                "model_type") == "t5":
            loader = "transformers.T5ForConditionalGeneration"
        print(f"lmforge export: {ckpt} -> {out} ({loader}.from_pretrained('{out}'))", file=sys.stderr)
    else:
        from lmforge.export.gguf import export_gguf

        out = export_gguf(ckpt, args.out, kind=args.type)
        print(f"lmforge export: {ckpt} -> {out} ({args.type}, {out.stat().st_size / 1e6:.1f} MB)", file=sys.stderr)
    return 0


def cmd_import(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="lmforge import", description="Import a model as an lmforge checkpoint.")
    sub = ap.add_subparsers(dest="format", required=True)
    hf = sub.add_parser("hf", help="a local Hugging Face Llama / Qwen2 / Qwen3 folder (safetensors)")
    hf.add_argument("path", metavar="HF_DIR")
    hf.add_argument("out", metavar="OUT_CHECKPOINT_DIR")
    args = ap.parse_args(argv)

    from pathlib import Path

    from lmforge.export.hf_import import import_hf

    if not Path(args.path).is_dir():
        raise LmforgeError(f"{args.path} is not a folder (give a local Hugging Face model folder)")
    out = import_hf(args.path, args.out)
    print(f"lmforge import: {args.path} -> {out} (lmforge generate {out})", file=sys.stderr)
    return 0
