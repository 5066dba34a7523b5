"""`lmforge quickstart`: the whole pretraining path in a few minutes on any machine.

With no arguments it trains a tokenizer and the `tiny` model on a corpus every machine with Python
has: the running interpreter's standard-library sources (the top-level `*.py` files, ~4.7 MB). It
fits a wall-clock budget by measuring its own step time, then reports validation loss, bits per
byte and a sample, and leaves a run directory that `pretrain`, `eval` and `generate` continue from.
"""

from __future__ import annotations

import math
import sysconfig
import time
from pathlib import Path

from lmforge.cli import CommandParser
from lmforge.config import load_config
from lmforge.console import console
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


def cmd_quickstart(argv: list[str]) -> int:
    p = CommandParser("quickstart", __doc__.split("\n\n")[0], recipe=RECIPE)
    p.add_argument("--data", action="append", default=None,
                   help="your own text: file, folder or glob (repeatable); default: Python's stdlib sources")
    p.add_argument("--minutes", type=float, default=5.0, help="wall-clock budget for the whole run")
    p.add_argument("--run-dir", default="runs/quickstart")
    p.add_argument("overrides", nargs="*", help="any key=value, e.g. model.n_layer=6")
    a = p.parse_args(argv)
    if a.minutes <= 0.5:
        raise LmforgeError("--minutes must be more than 0.5")
    t0 = time.perf_counter()
    sources = a.data or [default_corpus()]
    cfg = load_config(RECIPE, [f"run_dir={a.run_dir}", *a.overrides])
    cfg.data.sources = sources
    console.rule("[bold]lmforge quickstart")
    console.print(f"corpus: {', '.join(sources)}\nrun dir: {cfg.run_dir}  budget: {a.minutes:g} min")

    from lmforge.stages import run_prepare, run_pretrain, run_tokenizer

    run = cfg.run_path
    if not (run / "tokenizer" / "tokenizer.json").is_file():
        run_tokenizer(cfg)
    if not (run / "data" / "train" / "manifest.json").is_file():
        run_prepare(cfg)
    # Final eval, sample and save take a few seconds; keep them inside the budget.
    left = a.minutes * 60 - (time.perf_counter() - t0) - 20
    if left < 30:
        raise LmforgeError(f"only {left:.0f}s of the {a.minutes:g}-minute budget are left for training; "
                           "give more --minutes")
    cfg.train.max_minutes = left / 60
    result = run_pretrain(cfg)

    base = unigram_loss(run / "data")
    m = result.metrics
    elapsed = time.perf_counter() - t0
    console.rule("[bold]result")
    console.print(f"steps {result.step}, {result.tokens_per_s:,.0f} tokens/s, MFU {100 * result.mfu:.1f}% "
                  f"of this machine's measured matmul rate, {elapsed / 60:.1f} min in all")
    if "val_loss" in m:
        console.print(f"validation loss {m['val_loss']:.3f} (perplexity {math.exp(m['val_loss']):.1f}) vs "
                      f"unigram baseline {base:.3f}; bits per byte {m.get('val_bpb', float('nan')):.3f}")
    console.print(f"checkpoint: {result.checkpoint}\n"
                  f"continue:   lmforge pretrain run_dir={cfg.run_dir} train.max_minutes=0 "
                  f"train.max_steps={2 * result.step}\n"
                  f"evaluate:   lmforge eval run_dir={cfg.run_dir}\n"
                  f"generate:   lmforge generate {result.checkpoint} --prompt 'def '")
    try:
        from lmforge.plot import write_plots  # matplotlib: imported only now that training is done

        png, page = write_plots([run])
        console.print(f"curves:     {png} (and {page.name} beside it; redraw with `lmforge plot {cfg.run_dir}`)")
    except Exception as e:  # noqa: BLE001 -- a picture must never fail a run that trained
        console.print(f"[yellow]curves not drawn[/] ({type(e).__name__}: {e}); try `lmforge plot {cfg.run_dir}`")
    return 0
