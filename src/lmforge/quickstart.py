"""`lmforge quickstart`: the whole pretraining path in a few minutes on any machine.

With no arguments it trains a tokenizer and the `tiny` model on a corpus every machine with Python
has: the running interpreter's standard-library sources (the top-level `*.py` files, ~4.7 MB). With
`--data` it does the same on the user's own text: a book in one file, a folder of code, JSONL.
It fits a wall-clock budget by measuring its own step time (or runs `train.max_steps` when that is
given), then reports validation loss, bits per byte and a sample that starts like a validation
document, and leaves a run directory that `pretrain`, `eval` and `generate` continue from.

Everything that can go wrong with the data is checked before training starts: too little text for a
validation split is an error that says how much there is and how much is needed, not a crash after
the budget was spent.
"""

from __future__ import annotations

import math
import os
import shlex
import sysconfig
import time
from pathlib import Path

from rich.markup import escape

from lmforge.cli import CommandParser
from lmforge.config import Config, load_config
from lmforge.console import console, log
from lmforge.errors import LmforgeError

RECIPE = Path(__file__).resolve().parent / "recipes" / "quickstart.yaml"  # recipes/quickstart.yaml links here


def default_corpus() -> str:
    return str(Path(sysconfig.get_paths()["stdlib"]) / "*.py")


def unigram_loss(split_dir: Path) -> float:
    """Entropy (nats/token) of the validation tokens under the training unigram distribution.

    The baseline a model that ignores context would reach: a real model must go clearly below it.
    """
    import numpy as np

    from lmforge.data.shards import open_shards

    train, m = open_shards(split_dir / "train")
    counts = np.zeros(int(m["vocab_size"]), dtype=np.float64)
    for s in train:
        counts += np.bincount(np.asarray(s), minlength=len(counts))[: len(counts)]
    p = (counts + 1.0) / (counts.sum() + len(counts))  # add-one: val tokens unseen in train stay finite
    val, _ = open_shards(split_dir / "val")
    ids = np.concatenate([np.asarray(s) for s in val])
    return float(-np.log(p[ids]).mean())


def _prepared_from(cfg: Config) -> str | None:
    """Why RUN's tokenizer and data cannot be reused for `cfg` ("" when they can; None: there are none)."""
    import json

    run = cfg.run_path
    manifest, report = run / "data" / "train" / "manifest.json", run / "tokenizer" / "report.json"
    if not manifest.is_file() or not (run / "tokenizer" / "tokenizer.json").is_file():
        return None
    try:
        m = json.loads(manifest.read_text(encoding="utf-8"))
        r = json.loads(report.read_text(encoding="utf-8")) if report.is_file() else {}
    except (OSError, ValueError):
        return "an unreadable data manifest"
    d = cfg.data
    wanted = {"sources": list(d.sources), "text_field": d.text_field, "val_fraction": d.val_fraction,
              "max_doc_bytes": d.max_doc_bytes}
    for key, value in wanted.items():
        if m.get(key) != value:
            return f"data.{key}={m.get(key)!r} (now {value!r})"
    requested = r.get("requested_vocab_size")
    if requested is not None and requested != cfg.tokenizer.vocab_size:
        return f"tokenizer.vocab_size={requested} (now {cfg.tokenizer.vocab_size})"
    return ""


def _amount(nbytes: float) -> str:
    return f"{nbytes:,.0f} bytes" if nbytes < 10_000 else f"{nbytes / 1e3:,.0f} KB"


def check_enough_text(cfg: Config) -> None:
    """Fail before training when the prepared data cannot give a training step and a validation loss."""
    from lmforge.data.shards import read_manifest

    if cfg.data.val_fraction <= 0:
        raise LmforgeError("quickstart reports a validation loss, but data.val_fraction=0 holds out no "
                           "validation text; leave it at its default or set it above 0")
    data, tc = cfg.run_path / "data", cfg.train
    train = read_manifest(data / "train")
    val = read_manifest(data / "val") if (data / "val" / "manifest.json").is_file() else None
    tokens = train["tokens"] + (val["tokens"] if val else 0)
    nbytes = train.get("bytes", 0) + (val.get("bytes", 0) if val else 0)
    docs = train["documents"] + (val["documents"] if val else 0)
    accum = max(1, tc.batch_tokens // (tc.micro_batch * tc.seq_len)) if tc.batch_tokens else 1
    step_tokens = tc.micro_batch * accum * tc.seq_len + 1
    if val is None:
        problem = "a validation split needs a document of its own"
    elif val["tokens"] < tc.seq_len + 1:
        problem = (f"the validation split holds {val['tokens']:,} tokens, fewer than one sequence of "
                   f"train.seq_len + 1 = {tc.seq_len + 1:,}")
    elif train["tokens"] < step_tokens:
        problem = (f"the training split holds {train['tokens']:,} tokens, fewer than one optimizer step of "
                   f"{step_tokens:,} (train.micro_batch x train.seq_len + 1)")
    else:
        return
    need = step_tokens + tc.seq_len + 1  # one training step and one validation sequence
    # Bytes per token grow with the text (more merges), so a tiny corpus's own ratio underestimates;
    # 4 is about what a 4k-token vocabulary reaches on English. 20 % more: the split is not exact.
    need_bytes = need * max(nbytes / max(tokens, 1), 4.0) * 1.2
    where = ""
    if docs < 2 and cfg.data.max_doc_bytes:  # one file must be long enough to be cut in two
        need_bytes = max(need_bytes, 2 * cfg.data.max_doc_bytes)
        where = (f", in at least 2 documents (a file is cut into documents of at most data.max_doc_bytes="
                 f"{cfg.data.max_doc_bytes:,} bytes)")
    elif docs < 2:
        where = ", in at least 2 files (data.max_doc_bytes=0 keeps each file one document)"
    raise LmforgeError(
        f"too little text for quickstart: {_amount(nbytes)} in {docs} document(s), {tokens:,} tokens; {problem}. "
        f"One training step and one validation sequence take {need:,} tokens: give about "
        f"{_amount(need_bytes)} of text{where}, or lower train.seq_len or train.micro_batch. Nothing was trained.")


def _prepare(cfg: Config) -> None:
    """Train the tokenizer and tokenize the data, unless RUN already holds both made from this data."""
    from lmforge.checkpoint import list_checkpoints
    from lmforge.stages import run_prepare, run_tokenizer

    why = _prepared_from(cfg)
    if why == "":
        log(f"[dim]reusing the tokenizer and data in {escape(cfg.run_dir)} (made from the same sources)[/dim]")
        return
    if why is not None:
        found = list_checkpoints(cfg.run_path / "checkpoints")
        if found:
            raise LmforgeError(f"{cfg.run_dir} holds a run trained on other data ({why}; checkpoint "
                               f"{found[-1]}); continuing it on this data would mix two runs. Give another "
                               f"--run-dir, or delete {cfg.run_dir} to start over")
        log(f"[dim]{escape(f'{cfg.run_dir}: its tokenizer and data were made with {why}; making them again')}[/dim]")
    run_tokenizer(cfg)
    run_prepare(cfg)


def _generate_line(checkpoint: Path, prompt: str) -> str:
    """A `generate` command a shell runs as printed, whatever the prompt holds (quotes, '-', Chinese)."""
    flag = "--prompt=" if prompt.startswith("-") else "--prompt "
    return f"lmforge generate {shlex.quote(str(checkpoint))} {flag}{shlex.quote(prompt)}"


def cmd_quickstart(argv: list[str]) -> int:
    p = CommandParser("quickstart", __doc__.split("\n\n")[0], recipe=RECIPE)
    p.add_argument("--data", action="append", default=None,
                   help="your own text: file, folder or glob (repeatable); default: Python's stdlib sources")
    p.add_argument("--minutes", type=float, default=5.0,
                   help="wall-clock budget for the whole run (train.max_steps=N runs N steps instead)")
    p.add_argument("--run-dir", default="runs/quickstart")
    p.add_argument("overrides", nargs="*", help="any key=value, e.g. model.n_layer=6")
    a = p.parse_args(argv)
    if a.minutes <= 0.5:
        raise LmforgeError("--minutes must be more than 0.5")
    t0 = time.perf_counter()
    # Absolute, so the run directory's saved config still finds the text from another directory.
    sources = [os.path.abspath(os.path.expanduser(s)) for s in a.data or [default_corpus()]]
    cfg = load_config(RECIPE, [f"run_dir={a.run_dir}", *a.overrides])
    cfg.data.sources = sources
    fixed_steps = any(o.split("=", 1)[0].strip() == "train.max_steps" for o in a.overrides)
    console.rule("[bold]lmforge quickstart")
    budget = f"{cfg.train.max_steps} steps" if fixed_steps else f"{a.minutes:g} min"
    console.print(escape(f"corpus: {', '.join(sources)}\nrun dir: {cfg.run_dir}  budget: {budget}"))

    from lmforge.stages import data_prompt, run_pretrain
    from lmforge.tokenizer import Tokenizer

    run = cfg.run_path
    _prepare(cfg)
    check_enough_text(cfg)
    if fixed_steps:
        cfg.train.max_minutes = 0.0
    else:
        # Final eval, sample and save take a few seconds; keep them inside the budget.
        left = a.minutes * 60 - (time.perf_counter() - t0) - 20
        if left < 30:
            raise LmforgeError(f"only {left:.0f}s of the {a.minutes:g}-minute budget are left for training; "
                               "give more --minutes")
        cfg.train.max_minutes = left / 60
    prompt = cfg.train.sample_prompt or data_prompt(Tokenizer.load(run / "tokenizer"), run / "data")
    result = run_pretrain(cfg)

    base = unigram_loss(run / "data")
    m = result.metrics
    elapsed = time.perf_counter() - t0
    console.rule("[bold]result")
    console.print(f"steps {result.step}, {result.tokens_per_s:,.0f} tokens/s, MFU {100 * result.mfu:.1f}% "
                  f"of this machine's measured matmul rate, {elapsed / 60:.1f} min in all")
    if "val_loss" in m:
        ppl = math.exp(min(m["val_loss"], 50.0))  # a diverged run must not end in an OverflowError
        console.print(f"validation loss {m['val_loss']:.3f} (perplexity {ppl:.1f}) vs "
                      f"unigram baseline {base:.3f}; bits per byte {m.get('val_bpb', float('nan')):.3f}")
    run_arg = shlex.quote(f"run_dir={cfg.run_dir}")
    console.print(escape(f"checkpoint: {result.checkpoint}\n"
                         f"continue:   lmforge pretrain {run_arg} train.max_minutes=0 "
                         f"train.max_steps={2 * result.step}\n"
                         f"evaluate:   lmforge eval {run_arg}\n"
                         f"generate:   {_generate_line(result.checkpoint, prompt)}"))
    try:
        from lmforge.plot import write_plots  # matplotlib: imported only now that training is done

        png, page = write_plots([run])
        console.print(escape(f"curves:     {png} (and {page.name} beside it; redraw with "
                             f"`lmforge plot {shlex.quote(cfg.run_dir)}`)"))
    except Exception as e:  # noqa: BLE001 -- a picture must never fail a run that trained
        console.print(f"[yellow]curves not drawn[/] ({escape(f'{type(e).__name__}: {e}')}); "
                      f"try `lmforge plot {escape(cfg.run_dir)}`")
    return 0
