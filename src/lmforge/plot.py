"""`lmforge plot RUN [RUN ...]`: a run's curves as a PNG and a self-contained HTML page.

Reads each run's metrics.jsonl (a run folder, a stage folder such as RUN/sft, or the file itself)
and draws train/validation loss, bits per byte, learning rate, tokens/s, gradient norm, MFU and
memory against steps (tokens on the top axis), several runs overlaid; any other numeric series a
stage logs (rewards/..., val_accuracy, ...) gets a panel of its own. The HTML page embeds the same
figure as SVG plus a table of each run's last values and its last sample, so it opens offline.
"""

from __future__ import annotations

import html
import io
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib import font_manager
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from lmforge.cli import CommandParser
from lmforge.errors import LmforgeError
from lmforge.io import atomic_write_bytes, atomic_write_text
from lmforge.monitor import STAGE_DIRS, hms

# Bookkeeping columns, not curves. val_ppl is exp(val_loss), already drawn as the loss; val_pairs a count;
# mfu_peak_flops the ceiling the MFU panel is already a fraction of; state_mb one figure, logged once.
NOT_SERIES = {"step", "time", "tokens", "generated_tokens", "total_steps", "eta_s", "val_ppl", "ppl", "val_pairs",
              "mfu_peak_flops", "state_mb"}


@dataclass(frozen=True)
class Panel:
    title: str
    keys: tuple[str, ...]  # series drawn together (train solid, val_ dashed)
    log: float = 0.0  # log y-axis when max/min of the data reaches this ratio; 0: always linear
    scale: float = 1.0  # multiply values (fraction -> percent)
    fmt: str = ""  # "eng": 1.2k / 3.4M ticks; "sci": 3e-4
    zero: bool = False  # the y-axis starts at 0 (a rate or a size: small wiggles should look small)


KNOWN = (
    Panel("loss (nats/token)", ("loss", "val_loss"), log=4),
    Panel("validation bits per byte", ("val_bpb",)),
    Panel("learning rate", ("lr",), fmt="sci"),
    Panel("throughput (tokens/s)", ("tokens_per_s",), fmt="eng", zero=True),
    Panel("gradient norm (before clipping)", ("grad_norm",), log=10),
    Panel("MFU (% of the measured matmul rate)", ("mfu",), scale=100, zero=True),
    Panel("peak memory (GiB)", ("memory_gb",), zero=True),
)


@dataclass
class RunMetrics:
    """One metrics.jsonl: per key, steps and values sorted by step (the last row for a step wins)."""

    path: Path  # the metrics.jsonl
    label: str = ""
    series: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    samples: list[tuple[int, str]] = field(default_factory=list)
    times: tuple[float, float] | None = None  # first and last row time
    bad_lines: int = 0
    nonfinite: dict[str, int] = field(default_factory=dict)  # key -> first step with NaN/inf

    @property
    def folder(self) -> Path:
        return self.path.parent

    @property
    def last_step(self) -> int:
        return max((int(s[-1]) for s, _ in self.series.values() if len(s)), default=0)

    def last(self, key: str) -> float | None:
        s = self.series.get(key)
        return float(s[1][-1]) if s is not None and len(s[1]) else None

    def tokens_at(self, steps: np.ndarray) -> np.ndarray | None:
        """Tokens seen by each step, interpolated between logged rows (eval rows carry no token count)."""
        if "tokens" not in self.series:
            return None
        s, t = self.series["tokens"]
        return np.interp(steps, np.concatenate([[0], s]), np.concatenate([[0], t]))


def metrics_file(path: str | Path) -> Path:
    """The metrics.jsonl a user means by `path`, or an error that says where the metrics are."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.exists():
        raise LmforgeError(f"{p}: no such run folder")
    if (p / "metrics.jsonl").is_file():
        return p / "metrics.jsonl"
    stages = [str(p / s) for s in STAGE_DIRS if (p / s / "metrics.jsonl").is_file()]
    hint = f"; its stages have their own: lmforge plot {' '.join(stages)}" if stages else \
        " (training writes it every train.log_every steps)"
    raise LmforgeError(f"{p} has no metrics.jsonl{hint}")


def read_metrics(path: str | Path) -> RunMetrics:
    """Parse a metrics.jsonl, tolerating a line cut by a crash or still being written."""
    f = metrics_file(path)
    rows: dict[str, dict[int, float]] = {}
    run = RunMetrics(f)
    t_first = t_last = None
    with open(f, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                step = int(row["step"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                run.bad_lines += 1
                continue
            if isinstance(row.get("time"), int | float):
                t_first = row["time"] if t_first is None else t_first
                t_last = row["time"]
            for key, value in row.items():
                if key == "sample" and isinstance(value, str):
                    run.samples.append((step, value))
                elif key not in NOT_SERIES - {"tokens"} and isinstance(value, int | float) \
                        and not isinstance(value, bool):
                    if not math.isfinite(value):
                        run.nonfinite.setdefault(key, step)
                        continue
                    rows.setdefault(key, {})[step] = float(value)
    for key, by_step in rows.items():
        steps = np.array(sorted(by_step), dtype=np.float64)
        run.series[key] = (steps, np.array([by_step[int(s)] for s in steps]))
    run.times = (t_first, t_last) if t_first is not None else None
    if not run.series:
        raise LmforgeError(f"{f}: no metric rows yet (training writes one every train.log_every steps)")
    return run


def short_labels(paths: list[Path]) -> list[str]:
    """The shortest trailing part of each folder's path that tells the runs apart (a/sft, b/sft).

    A stage folder always keeps its run's name: "sft" alone does not say whose.
    """
    parts = [p.resolve().parts for p in paths]
    least = [2 if p[-1] in STAGE_DIRS and len(p) > 1 else 1 for p in parts]
    for n in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-max(n, k):]) for p, k in zip(parts, least)]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in paths]


def panel_group(key: str, present: set[str]) -> str:
    """Which extra panel a series joins: val_x with x, rewards/a with rewards/b, x_max with x.

    An accuracy stays apart from its group (rewards/accuracies is a fraction, the margins are not).
    """
    base = key.removeprefix("val_")
    if "/" in base:
        return base if "accura" in base else base.split("/")[0]
    for suffix in ("_max", "_min", "_mean", "_std"):
        if base.endswith(suffix) and base.removesuffix(suffix) in present | {f"val_{k}" for k in present}:
            return base.removesuffix(suffix)
    return base


def panels_for(runs: list[RunMetrics]) -> list[Panel]:
    """The known panels that have data, then one per group of the other series."""
    present = {k for r in runs for k in r.series} - NOT_SERIES
    out = [p for p in KNOWN if present & set(p.keys)]
    known = {k for p in KNOWN for k in p.keys}
    groups: dict[str, list[str]] = {}
    for key in sorted(present - known):
        groups.setdefault(panel_group(key, present), []).append(key)
    for name, keys in groups.items():
        train_first = sorted(keys, key=lambda k: (k.startswith("val_"), k))
        title = name.replace("_", " ")
        out.append(Panel(f"validation {title}" if all(k.startswith("val_") for k in keys) else title,
                         tuple(train_first)))
    return out


def _style(key: str, index: int) -> dict:
    if key.startswith("val_"):
        return {"linestyle": "--", "marker": "o", "markersize": 3.5}
    return {"linestyle": ("-", ":", "-.", (0, (5, 1)))[index % 4]}


def draw(runs: list[RunMetrics], x: str = "step") -> Figure:
    """The figure: one panel per metric, runs in colours, validation dashed with markers."""
    panels = panels_for(runs)
    shared_tokens = _shared_token_rate(runs)
    if x == "step" and len(runs) > 1 and shared_tokens is None and any("tokens" in r.series for r in runs):
        # runs with different batch sizes compare fairly only by tokens seen
        panels.insert(1, Panel("loss vs tokens seen (nats/token)", ("loss", "val_loss"), log=4, fmt="by-tokens"))
    cols = 3 if len(panels) > 8 else 2
    rows = math.ceil(len(panels) / cols)
    # A fixed layout in inches (constrained layout doubled the drawing time for no visible gain):
    # each row is 3.6 in, of which about 1.1 in holds the title, the tokens axis and the step label.
    title_in = 0.35 + 0.2 * (1 if len(runs) == 1 else len(runs))
    top_in = title_in + (0.55 if shared_tokens and x == "step" else 0.3)
    width, height = 7.2 * cols, 3.6 * rows + title_in
    fig = Figure(figsize=(width, height))
    fig.subplots_adjust(left=0.75 / width, right=1 - 0.25 / width, bottom=0.5 / height, top=1 - top_in / height,
                        wspace=0.9 / 6.2, hspace=1.1 / 2.5)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    max_step = max(r.last_step for r in runs)
    max_tokens = max((float(r.tokens_at(np.array([r.last_step]))[0]) for r in runs if "tokens" in r.series),
                     default=0.0)
    for ax, panel in zip(axes, panels):
        by_tokens = x == "tokens" or panel.fmt == "by-tokens"
        values_seen: list[np.ndarray] = []
        n_series = sum(1 for r in runs for k in panel.keys if k in r.series)
        for ri, run in enumerate(runs):
            for ki, key in enumerate(panel.keys):
                if key not in run.series:
                    continue
                steps, values = run.series[key]
                xs = run.tokens_at(steps) if by_tokens else steps
                if xs is None:
                    continue
                values = values * panel.scale
                values_seen.append(values)
                label = _label(run.label, key, len(runs), len(panel.keys))
                ax.plot(xs, values, color=colors[ri % len(colors)], linewidth=1.6, label=label,
                        **(_style(key, ki) if len(steps) > 1 else {"marker": "o", "linestyle": "none"}))
        ax.set_title(panel.title, fontsize=11, loc="left")
        ax.set_xlabel("tokens seen" if by_tokens else "step")
        ax.grid(True, alpha=0.3)
        # Every panel spans the whole run, so panels line up and a lone validation point sits in context.
        right = max_tokens if by_tokens else max_step
        if right > 0:
            ax.set_xlim(0, right * 1.02)
        if not by_tokens:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if by_tokens:
            ax.xaxis.set_major_formatter(EngFormatter(sep=""))
        elif shared_tokens:
            top = ax.secondary_xaxis("top", functions=(lambda s, r=shared_tokens: s * r,
                                                       lambda t, r=shared_tokens: t / r))
            top.xaxis.set_major_formatter(EngFormatter(sep=""))
            top.tick_params(labelsize=8, colors="0.4")
            top.set_xlabel("tokens seen", fontsize=8, color="0.4", labelpad=2, loc="right")
        if values_seen:
            data = np.concatenate(values_seen)
            low, high = float(data.min()), float(data.max())
            if panel.log and low > 0 and high / low >= panel.log:
                ax.set_yscale("log")
                # Label 1-2-3-5 (or every digit over a short range) instead of bare powers of ten.
                subs = tuple(range(1, 10)) if high / low < 8 else (1, 2, 3, 5)
                ax.yaxis.set_major_locator(LogLocator(subs=subs))
                ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:g}"))
                ax.yaxis.set_minor_formatter(NullFormatter())
        if panel.fmt == "eng":
            ax.yaxis.set_major_formatter(EngFormatter(sep=""))
        elif panel.fmt == "sci":
            ax.yaxis.set_major_formatter(FuncFormatter(_sci))
        if panel.zero and values_seen and ax.get_yscale() == "linear":
            ax.set_ylim(0, max(high, 0.0) * 1.08 or 1.0)
        if n_series > 1:
            ax.legend(fontsize=8, loc="best", framealpha=0.8)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(_title(runs), fontsize=12, x=0.12 / width, y=1 - 0.12 / height, horizontalalignment="left",
                 verticalalignment="top")
    return fig


def _sci(value: float, _pos: int = 0) -> str:
    """3e-4, 2.5e-4: a learning rate as people write it."""
    if not value:
        return "0"
    mantissa, exponent = f"{value:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _label(run: str, key: str, n_runs: int, n_keys: int) -> str:
    series = {"loss": "train", "val_loss": "val"}.get(key, key)
    if n_runs == 1:
        return series
    return run if n_keys == 1 else f"{run}: {series}"


def _shared_token_rate(runs: list[RunMetrics]) -> float | None:
    """Tokens per step if every run trains the same number per step (then one top axis fits all)."""
    rates = []
    for r in runs:
        if "tokens" not in r.series:
            return None
        s, t = r.series["tokens"]
        rate = t / np.maximum(s, 1)
        if not np.allclose(rate, rate[-1], rtol=0.02):
            return None  # tokens per step vary (packed SFT, GRPO): a linear top axis would lie
        rates.append(float(rate[-1]))
    return rates[0] if rates and np.allclose(rates, rates[0], rtol=0.01) else None


def summary(run: RunMetrics) -> str:
    parts = [f"step {run.last_step:,}"]
    tokens = run.last("tokens")
    if tokens:
        parts.append(f"{_eng(tokens)} tokens")
    for key, name in (("loss", "train loss"), ("val_loss", "val loss"), ("val_bpb", "bits/byte")):
        v = run.last(key)
        if v is not None:
            parts.append(f"{name} {v:.3f}")
    return ", ".join(parts)


def _title(runs: list[RunMetrics]) -> str:
    if len(runs) == 1:
        return f"lmforge · {runs[0].label} — {summary(runs[0])}"
    return "lmforge · " + "\n".join(f"{r.label}: {summary(r)}" for r in runs)


def _eng(value: float) -> str:
    return EngFormatter(sep="", places=1)(value).replace(".0", "")


# --- the files ----------------------------------------------------------------------------------

# Fallbacks for Chinese and Japanese run names, tried glyph by glyph after DejaVu Sans when installed.
CJK_FONTS = ("Noto Sans CJK SC", "Noto Sans CJK JP", "Source Han Sans SC", "WenQuanYi Zen Hei", "WenQuanYi Micro Hei",
             "Microsoft YaHei", "SimHei", "PingFang SC", "Hiragino Sans GB", "Heiti SC", "Arial Unicode MS")


def font_rc() -> dict:
    installed = {f.name for f in font_manager.fontManager.ttflist}
    return {"font.family": ["DejaVu Sans", *(f for f in CJK_FONTS if f in installed)]}


def output_paths(runs: list[RunMetrics], out: str | None) -> tuple[Path, Path]:
    """(png, html): RUN/plots/curves.* by default; `--out X.png` or `--out DIR` to choose."""
    if out is None:
        base = runs[0].folder / "plots" / "curves"
    else:
        p = Path(out)
        base = p.with_suffix("") if p.suffix.lower() in (".png", ".html", ".htm") else p / "curves"
    return base.with_suffix(".png"), base.with_suffix(".html")


def render_png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def render_svg(fig: Figure) -> str:
    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # text stays text: smaller, and any script renders
        fig.savefig(buf, format="svg")
    svg = buf.getvalue()
    return svg[svg.index("<svg"):]


def _cell(value: float | None, fmt: str = ".4f") -> str:
    return "" if value is None else format(value, fmt)


def render_html(runs: list[RunMetrics], svg: str) -> str:
    head = ("<th>run</th><th>steps</th><th>tokens</th><th>train loss</th><th>val loss</th>"
            "<th>best val loss (step)</th><th>bits/byte</th><th>tokens/s (median)</th><th>wall time</th>")
    body = []
    for r in runs:
        best = ""
        if "val_loss" in r.series:
            s, v = r.series["val_loss"]
            i = int(np.argmin(v))
            best = f"{v[i]:.4f} ({int(s[i]):,})"
        tps = r.series.get("tokens_per_s")
        wall = hms(r.times[1] - r.times[0]) if r.times else ""
        body.append(f"<tr><td title='{html.escape(str(r.path))}'>{html.escape(r.label)}</td>"
                    f"<td>{r.last_step:,}</td><td>{_eng(r.last('tokens')) if r.last('tokens') else ''}</td>"
                    f"<td>{_cell(r.last('loss'))}</td><td>{_cell(r.last('val_loss'))}</td><td>{best}</td>"
                    f"<td>{_cell(r.last('val_bpb'))}</td>"
                    f"<td>{'' if tps is None else f'{float(np.median(tps[1])):,.0f}'}</td><td>{wall}</td></tr>")
    notes = [f"{html.escape(r.label)}: {k} is NaN/inf from step {s:,}" for r in runs for k, s in r.nonfinite.items()]
    samples = "".join(f"<h3>{html.escape(r.label)}, step {r.samples[-1][0]:,}</h3>"
                      f"<pre>{html.escape(r.samples[-1][1])}</pre>" for r in runs if r.samples)
    title = "lmforge · " + ", ".join(r.label for r in runs)
    sources = "<br>".join(html.escape(str(r.path.resolve())) for r in runs)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, -apple-system, "Segoe UI", "Noto Sans", "PingFang SC", sans-serif; color: #222;
       max-width: 1500px; margin: 1.5em auto; padding: 0 1em; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ padding: .35em .9em; border-bottom: 1px solid #ddd; text-align: right; font-variant-numeric: tabular-nums; }}
th:first-child, td:first-child {{ text-align: left; }}
svg {{ width: 100%; height: auto; }}
pre {{ white-space: pre-wrap; background: #f5f5f5; padding: .8em; max-height: 20em; overflow: auto; }}
.note {{ color: #a33; }} .dim {{ color: #777; font-size: .9em; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<table><tr>{head}</tr>{''.join(body)}</table>
{''.join(f'<p class="note">{n}</p>' for n in notes)}
<figure>{svg}</figure>
{'<h2>last sample</h2>' + samples if samples else ''}
<p class="dim">from {sources}<br>written {time.strftime('%Y-%m-%d %H:%M:%S')} by lmforge plot</p>
</body></html>
"""


def load_runs(paths: list[str | Path]) -> list[RunMetrics]:
    """Each run's metrics, labelled by the shortest path tail that tells them apart."""
    runs = [read_metrics(p) for p in paths]
    for r, label in zip(runs, short_labels([r.folder for r in runs])):
        r.label = label
    return runs


def write_plots(runs: list[str | Path] | list[RunMetrics], out: str | None = None,
                x: str = "step") -> tuple[Path, Path]:
    """Draw the runs (paths or loaded RunMetrics); write the PNG and the HTML page; return their paths."""
    if not all(isinstance(r, RunMetrics) for r in runs):
        runs = load_runs(runs)
    png, page = output_paths(runs, out)
    fonts = font_rc()
    with matplotlib.rc_context(fonts), warnings.catch_warnings():  # fonts are picked when text is made and drawn
        if len(fonts["font.family"]) == 1 and any(not r.label.isascii() for r in runs):
            warnings.filterwarnings("ignore", message="Glyph .* missing from font")
            print("lmforge plot: no CJK font installed, so non-Latin run names show as boxes in the PNG (the "
                  "HTML page shows them); Debian/Ubuntu: apt-get install fonts-noto-cjk", file=sys.stderr)
        fig = draw(runs, x)
        atomic_write_bytes(png, render_png(fig))
        atomic_write_text(page, render_html(runs, render_svg(fig)))
    return png, page


def cmd_plot(argv: list[str]) -> int:
    p = CommandParser("plot", "Draw the curves of one or more runs (their metrics.jsonl) into a PNG and an "
                      "HTML page. Default output: FIRST_RUN/plots/curves.png and curves.html.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folder, stage folder (RUN/sft) or metrics.jsonl")
    p.add_argument("--out", default=None, help="FILE.png (FILE.html beside it) or a folder for curves.png/.html")
    p.add_argument("--x", choices=["step", "tokens"], default="step", help="horizontal axis (default: step)")
    a = p.parse_args(argv)
    runs = load_runs(a.runs)
    for r in runs:
        if r.bad_lines:
            print(f"lmforge plot: {r.path}: skipped {r.bad_lines} unreadable line(s)", file=sys.stderr)
        for key, step in r.nonfinite.items():
            print(f"lmforge plot: {r.path}: {key} is NaN/inf from step {step}", file=sys.stderr)
    png, page = write_plots(runs, a.out, a.x)
    print(f"wrote {png}\n      {page}")
    return 0
