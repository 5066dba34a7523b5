"""`lmforge plot`: curves of synthetic metrics.jsonl files as a PNG and a self-contained HTML page."""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from spine import lmforge

from lmforge import cli, plot
from lmforge.errors import LmforgeError


def write_metrics(folder: Path, steps: int = 200, batch: int = 4096, post: bool = False, cut: bool = True) -> Path:
    """Rows as the training loop writes them: log rows, eval rows, samples; a post-training stage adds
    rewards/... and val_accuracy. The last line is cut, as a crash (or a live run) leaves it."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for s in range(10, steps + 1, 10):
        loss = 2.0 + 10 * math.exp(-s / 40)
        rows.append({"step": s, "time": 1.7e9 + 2 * s, "loss": loss, "lr": 3e-4 * min(1, s / 50),
                     "tokens": s * batch, "tokens_per_s": 8000.0, "mfu": 0.4, "memory_gb": 3.2,
                     "grad_norm": 0.3 + 5 * math.exp(-s / 30), "total_steps": steps, "eta_s": 2.0 * (steps - s)})
        if post:
            rows[-1].update({"rewards/exact_match": s / steps, "rewards/format": 0.5})
        if s % 50 == 0:
            rows.append({"step": s, "val_loss": loss + 0.1, "val_ppl": math.exp(loss + 0.1),
                         "val_bpb": (loss + 0.1) / math.log(2) / 3.5})
            if post:
                rows.append({"step": s, "val_accuracy": s / steps})
        if s % 100 == 0:
            rows.append({"step": s, "sample": f"def f():\n    return {s}  # <b>中文</b>"})
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (folder / "metrics.jsonl").write_text(text + ('{"step": 21' if cut else ""), encoding="utf-8")
    return folder


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_plot_writes_png_and_offline_html(tmp_path):
    run = write_metrics(tmp_path / "run")
    png, page = plot.write_plots([run])
    assert (png, page) == (run / "plots" / "curves.png", run / "plots" / "curves.html")  # default: in the run
    w, h = png_size(png)
    assert w > 1000 and h > 800
    doc = page.read_text(encoding="utf-8")
    assert doc.count("<svg") == 1 and "<tr>" in doc
    # self-contained: nothing is fetched (the only URLs are XML namespace names)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", doc)
    assert "<script" not in doc and "<link" not in doc
    assert f"{2.0 + 10 * math.exp(-5):.4f}" in doc and "200" in doc  # the table: last step and values
    assert "&lt;b&gt;中文&lt;/b&gt;" in doc  # the last sample, escaped, Chinese intact


def test_panels_cover_known_series_and_others(tmp_path):
    runs = plot.load_runs([write_metrics(tmp_path / "a"), write_metrics(tmp_path / "a" / "grpo", post=True)])
    assert [r.label for r in runs] == ["a", "a/grpo"]  # a stage keeps its run's name
    titles = [p.title for p in plot.panels_for(runs)]
    for expected in ("loss (nats/token)", "validation bits per byte", "learning rate", "throughput (tokens/s)",
                     "gradient norm (before clipping)", "rewards", "validation accuracy"):
        assert expected in titles, titles
    rewards = next(p for p in plot.panels_for(runs) if p.title == "rewards")
    assert rewards.keys == ("rewards/exact_match", "rewards/format")
    drawn = {k for p in plot.panels_for(runs) for k in p.keys}
    assert not drawn & {"val_ppl", "total_steps", "eta_s", "time", "step"}  # bookkeeping is not a curve
    dpo = plot.RunMetrics(tmp_path / "dpo" / "metrics.jsonl", "dpo")
    for key in ("loss", "rewards/chosen", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected",
                "completion_length", "completion_length_max", "accuracy", "val_accuracy", "val_pairs"):
        dpo.series[key] = (np.array([1.0, 2.0]), np.array([0.5, 0.6]))
    panels = {p.title: p.keys for p in plot.panels_for([dpo])}
    assert panels["rewards"] == ("rewards/chosen", "rewards/margins")
    assert panels["rewards/accuracies"] == ("rewards/accuracies",)  # a fraction: not on the margins' axis
    assert panels["logps"] == ("logps/chosen", "logps/rejected")
    assert panels["completion length"] == ("completion_length", "completion_length_max")
    assert panels["accuracy"] == ("accuracy", "val_accuracy")
    assert not any("val_pairs" in keys for keys in panels.values())
    loss = plot.read_metrics(tmp_path / "a")
    assert loss.bad_lines == 1 and loss.last_step == 200  # the cut line is skipped, the rest read


def test_figure_axes_scales_and_token_view(tmp_path):
    a = write_metrics(tmp_path / "a", batch=4096)
    b = write_metrics(tmp_path / "b", batch=8192, steps=100)
    fig = plot.draw(plot.load_runs([a, b]))
    axes = {ax.get_title(loc="left"): ax for ax in fig.axes if ax.get_visible() and ax.get_title(loc="left")}
    # runs with different tokens per step are also compared against tokens seen
    assert "loss vs tokens seen (nats/token)" in axes
    assert axes["loss vs tokens seen (nats/token)"].get_xlabel() == "tokens seen"
    assert axes["loss (nats/token)"].get_yscale() == "log"  # 9.8 -> 2.1 spans more than 4x
    assert axes["learning rate"].get_yscale() == "linear"
    assert axes["throughput (tokens/s)"].get_ylim()[0] == 0
    labels = [t.get_text() for t in axes["loss (nats/token)"].get_legend().get_texts()]
    assert labels == ["a: train", "a: val", "b: train", "b: val"]
    one = plot.draw(plot.load_runs([a]))
    titles = [ax.get_title(loc="left") for ax in one.axes]
    assert "loss vs tokens seen (nats/token)" not in titles  # one run: tokens are on the top axis instead
    assert "step 200" in one.texts[0].get_text() or "step 200" in one._suptitle.get_text()


def test_plot_cli_default_out(tmp_path):
    run = write_metrics(tmp_path / "run")
    write_metrics(tmp_path / "run" / "sft", post=True, cut=False)
    r = lmforge("plot", str(run), str(run / "sft"))
    assert r.returncode == 0, r.stderr
    assert str(run / "plots" / "curves.png") in r.stdout and "curves.html" in r.stdout
    assert "skipped 1 unreadable line" in r.stderr
    out = tmp_path / "elsewhere" / "cmp.png"
    assert cli_code(["plot", str(run / "sft" / "metrics.jsonl"), "--out", str(out), "--x", "tokens"]) == 0
    assert png_size(out)[0] > 500 and out.with_suffix(".html").is_file()


def cli_code(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    return e.value.code


def test_plot_errors_say_where_the_metrics_are(tmp_path, capsys):
    (tmp_path / "bare" / "sft").mkdir(parents=True)
    write_metrics(tmp_path / "bare" / "sft")
    assert cli_code(["plot", str(tmp_path / "bare")]) == 2
    err = capsys.readouterr().err
    assert "has no metrics.jsonl" in err and f"lmforge plot {tmp_path / 'bare' / 'sft'}" in err
    assert "Traceback" not in err
    assert cli_code(["plot", str(tmp_path / "nowhere")]) == 2
    assert "no such run folder" in capsys.readouterr().err


def test_empty_and_nan_metrics(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    with pytest.raises(LmforgeError, match="no metric rows yet"):
        plot.read_metrics(tmp_path / "empty")
    run = write_metrics(tmp_path / "nan", cut=False)
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 210, "loss": float("nan"), "lr": 1e-4, "tokens": 210 * 4096}) + "\n")
    m = plot.read_metrics(run)
    assert m.nonfinite == {"loss": 210} and m.last("loss") == pytest.approx(2.0 + 10 * math.exp(-5))
    png, page = plot.write_plots([run])
    assert "loss is NaN/inf from step 210" in page.read_text(encoding="utf-8")
