"""`lmforge monitor RUN`: a live view of a running (or finished) run, from its files alone.

It reads what training writes into the run folder and nothing else, so it works from another
terminal, or another machine that mounts the folder: metrics.jsonl (latest values, ETA, last
sample), checkpoints/ (sizes, which are resumable), and lmforge.lock, which the training process
holds an advisory flock on while it runs (JSON: pid, host, started, command). "Alive" is that lock
being held; on the same host the pid is checked too. Without a lock file (a run from an older
version) the age of the last metrics row is all there is, and the view says so.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import yaml
from rich.console import Console, Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from lmforge.cli import CommandParser
from lmforge.errors import LmforgeError
from lmforge.io import pid_alive
from lmforge.rundir import LOCK_FILE, lock_held, read_lock_file

STAGE_DIRS = ("sft", "dpo", "rm", "grpo", "grpo-rm")
STEP_DIR = re.compile(r"^step_(\d+)$")
WRITING_DIR = re.compile(r"^\.(step_\d+)\.tmp-(\d+)$")  # lmforge.io.AtomicDir's temporary name
TRAIN_KEYS = ("loss", "lr", "tokens", "tokens_per_s", "mfu", "memory_gb", "grad_norm")
BOOKKEEPING = {"step", "time", "total_steps", "eta_s", "sample"}


# --- metrics.jsonl, read incrementally --------------------------------------------------------------

@dataclass
class MetricsTail:
    """The parts of a growing metrics.jsonl the view needs, updated by reading only the new bytes."""

    path: Path
    offset: int = 0
    latest: dict[str, tuple[int, float]] = field(default_factory=dict)  # key -> (step, value)
    last_row: dict = field(default_factory=dict)
    best_val: tuple[float, int] | None = None  # (val_loss, step)
    sample: tuple[int, str] | None = None
    first_time: float | None = None
    recent: deque = field(default_factory=lambda: deque(maxlen=30))  # (step, time) of log rows

    def update(self) -> None:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return
        if size < self.offset:  # truncated: a resume dropped the rows past its checkpoint
            self.__init__(self.path)
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # a line still being written waits for the next update
        self.offset += end
        for line in data[:end].decode("utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                self._add(row)

    def _add(self, row: dict) -> None:
        step, t = row["step"], row.get("time")
        self.last_row = row
        if isinstance(t, int | float):
            self.first_time = t if self.first_time is None else self.first_time
            if "loss" in row or "lr" in row:
                self.recent.append((step, t))
        for key, value in row.items():
            if key == "sample" and isinstance(value, str):
                self.sample = (step, value)
            elif isinstance(value, int | float) and not isinstance(value, bool) and key not in ("step", "time"):
                self.latest[key] = (step, float(value))
        v = row.get("val_loss")
        if isinstance(v, int | float) and v == v and (self.best_val is None or v < self.best_val[0]):
            self.best_val = (float(v), step)

    @property
    def step(self) -> int:
        return max((s for s, _ in self.latest.values()), default=0)

    def seconds_per_step(self) -> float | None:
        if len(self.recent) < 2:
            return None
        (s0, t0), (s1, t1) = self.recent[0], self.recent[-1]
        return (t1 - t0) / (s1 - s0) if s1 > s0 else None


# --- the lock: is the training process alive? -------------------------------------------------------

@dataclass
class Liveness:
    state: str  # running | stopped | probably running | probably stopped (no lock file) | unknown
    detail: str
    lock: dict = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return self.state in ("running", "probably running")


def liveness(folder: Path, last_row_age: float | None, typical_interval: float | None) -> Liveness:
    path = folder / LOCK_FILE
    if not path.is_file():
        if last_row_age is None:
            return Liveness("unknown", "no lock file and no metrics yet")
        fresh = last_row_age < max(120.0, 5 * (typical_interval or 0))
        return Liveness("probably running" if fresh else "probably stopped",
                        f"no {LOCK_FILE} to check (a run from an lmforge without run locks); judged by the last "
                        f"metrics row, {ago(last_row_age)}")
    lock = read_lock_file(folder)
    pid, host = lock.get("pid"), str(lock.get("host", ""))
    who = f"pid {pid} on {host}" if host else f"pid {pid}"
    here = host in ("", socket.gethostname())
    if here and isinstance(pid, int) and not pid_alive(pid):
        return Liveness("stopped", f"{who} has exited (the lock file is left from it)", lock)
    held = lock_held(path)
    if held:
        return Liveness("running", f"{who}, lock held", lock)
    if held is False:
        return Liveness("stopped", f"{who}: lock released, the process has ended", lock)
    if here and isinstance(pid, int):
        return Liveness("running", f"{who} is alive (the lock cannot be probed on this filesystem)", lock)
    return Liveness("unknown", f"{who}: cannot probe the lock from here (filesystem without locks)", lock)


# --- checkpoints, totals ---------------------------------------------------------------------------

@dataclass
class CheckpointInfo:
    name: str
    size: int
    mtime: float
    resumable: bool
    writing: bool = False


def folder_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:
                pass  # deleted while we looked (pruning)
    return total


def checkpoints(folder: Path) -> list[CheckpointInfo]:
    root = folder / "checkpoints"
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        writing = WRITING_DIR.match(p.name)
        if not (p.is_dir() and (STEP_DIR.match(p.name) or writing)):
            continue
        try:
            mtime = p.stat().st_mtime
        except OSError:
            continue
        out.append(CheckpointInfo(writing.group(1) if writing else p.name, folder_size(p), mtime,
                                  (p / "trainer_state.json").is_file(), bool(writing)))
    return sorted(out, key=lambda c: (c.name, c.writing))


def total_steps(folder: Path, tail: MetricsTail, ckpts: list[CheckpointInfo]) -> int | None:
    """From the metrics rows; else the newest checkpoint's trainer_state.json; else the saved config."""
    if "total_steps" in tail.latest and tail.latest["total_steps"][1] > 0:
        return int(tail.latest["total_steps"][1])
    done = [c for c in ckpts if not c.writing]
    if done:
        try:
            state = json.loads((folder / "checkpoints" / done[-1].name / "trainer_state.json").read_text())
            if int(state.get("total_steps") or 0) > 0:
                return int(state["total_steps"])
        except (OSError, ValueError, TypeError, AttributeError):
            pass
    for cfg_file in ([folder / "checkpoints" / done[-1].name / "lmforge.yaml"] if done else []) + \
            [folder / "lmforge.yaml"]:
        try:
            train = (yaml.safe_load(cfg_file.read_text(encoding="utf-8")) or {}).get("train", {})
        except (OSError, yaml.YAMLError, AttributeError):
            continue
        if isinstance(train, dict) and not train.get("max_minutes") and int(train.get("max_steps") or 0) > 0:
            return int(train["max_steps"])
    return None


# --- one snapshot ----------------------------------------------------------------------------------

@dataclass
class Snapshot:
    folder: Path
    live: Liveness
    tail: MetricsTail
    ckpts: list[CheckpointInfo]
    total: int | None
    eta_s: float | None
    last_row_age: float | None
    stalled: str = ""
    others: list[str] = field(default_factory=list)
    free_bytes: int | None = None

    @property
    def finished(self) -> bool:
        # "probably running" at the last step is a run that just ended (its last row is still fresh)
        return self.live.state != "running" and bool(self.total) and self.tail.step >= self.total


def pick_folder(path: Path) -> tuple[Path, list[Path]]:
    """The folder to watch (the run, or its most recently active stage) and the run's other stages."""
    if not path.is_dir():
        raise LmforgeError(f"{path}: no such run folder")
    candidates = [p for p in (path, *(path / s for s in STAGE_DIRS))
                  if (p / "metrics.jsonl").is_file() or (p / LOCK_FILE).is_file() or (p / "checkpoints").is_dir()]
    if not candidates:
        return path, []

    def activity(p: Path) -> float:
        return max((f.stat().st_mtime for f in (p / "metrics.jsonl", p / LOCK_FILE) if f.is_file()), default=0.0)

    chosen = max(candidates, key=activity)
    return chosen, [p for p in candidates if p != chosen]


def take_snapshot(folder: Path, tail: MetricsTail, others: list[Path] = (), now: float | None = None) -> Snapshot:
    now = time.time() if now is None else now
    tail.update()
    ckpts = checkpoints(folder)
    t_last = tail.last_row.get("time") if isinstance(tail.last_row.get("time"), int | float) else None
    age = now - t_last if t_last is not None else None
    per_step = tail.seconds_per_step()
    interval = None
    if len(tail.recent) >= 2:
        interval = (tail.recent[-1][1] - tail.recent[0][1]) / (len(tail.recent) - 1)
    live = liveness(folder, age, interval)
    total = total_steps(folder, tail, ckpts)
    eta = None
    if live.active and total and tail.step < total:
        if "eta_s" in tail.latest and t_last is not None:
            eta = max(0.0, tail.latest["eta_s"][1] - (now - t_last))
        elif per_step:
            eta = (total - tail.step) * per_step
    stalled = ""
    if live.state == "running" and age is not None and age > max(600.0, 20 * (interval or 0)):
        stalled = f"no new metrics for {ago(age, suffix=False)}"
        if interval:
            stalled += f" (rows usually come every {interval:.0f} s): stuck, or in a long eval/save?"
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    return Snapshot(folder, live, tail, ckpts, total, eta, age, stalled,
                    [f"{p} ({ago(now - (p / 'metrics.jsonl').stat().st_mtime)})" if (p / "metrics.jsonl").is_file()
                     else str(p) for p in others], free)


# --- rendering -------------------------------------------------------------------------------------

def hms(s: float) -> str:
    s = max(0, int(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def ago(seconds: float, suffix: bool = True) -> str:
    s = max(0.0, seconds)
    text = f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h" \
        if s < 172800 else f"{s / 86400:.0f} days"
    return f"{text} ago" if suffix else text


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _train_field(key: str, value: float) -> str:
    """One progress-line field, named and formatted as the training loop's own line shows it."""
    if key == "lr":
        return f"lr {value:.2e}"
    if key == "mfu":
        return f"MFU {100 * value:.1f}%"
    if key == "tokens":
        return f"{value:,.0f} tokens"
    if key == "tokens_per_s":
        return f"{value:,.0f} tok/s"
    if key == "memory_gb":
        return f"mem {value:.2f} GiB"
    if key == "grad_norm":
        return f"grad norm {value:.3f}"
    return f"{key} {value:.4f}"


def render(snap: Snapshot, now: float | None = None) -> Group:
    now = time.time() if now is None else now
    t = snap.tail
    colour = {"running": "green", "stopped": "red", "probably stopped": "red"}.get(snap.live.state, "yellow")
    state = "finished" if snap.finished else snap.live.state
    if state == "finished":
        colour = "cyan"
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    grid.add_row("status", Text.from_markup(f"[{colour} bold]{state}[/] — {escape(snap.live.detail)}"))
    lock = snap.live.lock
    if lock.get("command"):
        cmd = lock["command"] if isinstance(lock["command"], str) else " ".join(map(str, lock["command"]))
        grid.add_row("command", escape(cmd))
    started = _when(lock.get("started")) or t.first_time
    if started:
        grid.add_row("started", f"{datetime.fromtimestamp(started):%Y-%m-%d %H:%M:%S} ({ago(now - started)})")
    if snap.stalled:
        grid.add_row("warning", Text(snap.stalled, style="yellow"))
    if t.latest:
        line = f"step {t.step:,}"
        if snap.total:
            line += f" / {snap.total:,} ({100 * min(t.step, snap.total) / snap.total:.1f}%)"
        if snap.eta_s is not None:
            line += f"   ETA {hms(snap.eta_s)} (about {datetime.fromtimestamp(now + snap.eta_s):%H:%M})"
        if snap.last_row_age is not None:
            line += f"   last row {ago(snap.last_row_age)}"
        grid.add_row("progress", line)
        train = [_train_field(k, t.latest[k][1]) for k in TRAIN_KEYS if k in t.latest]
        if train:
            grid.add_row("train", "  ".join(train))
        val = {k: v for k, v in t.latest.items() if k.startswith("val_")}
        if val:
            at = max(s for s, _ in val.values())
            text = f"at step {at:,}: " + "  ".join(f"{k} {v:.4f}" for k, (_s, v) in val.items())
            if t.best_val:
                text += f"  (best val_loss {t.best_val[0]:.4f} at step {t.best_val[1]:,})"
            grid.add_row("eval", text)
        other = [f"{k} {v:.4g}" for k, (_s, v) in t.latest.items()
                 if k not in TRAIN_KEYS and k not in BOOKKEEPING and not k.startswith("val_")]
        if other:
            grid.add_row("other", escape("  ".join(other)))
    else:
        grid.add_row("progress", "no metrics yet (the first row comes after train.log_every steps)")
    done = [c for c in snap.ckpts if not c.writing]
    head = f"{len(done)} in {snap.folder / 'checkpoints'}, {human_bytes(sum(c.size for c in snap.ckpts))}"
    if snap.free_bytes is not None:
        head += f"; {human_bytes(snap.free_bytes)} free on that disk"
    grid.add_row("checkpoints", head if snap.ckpts else "none yet")
    for c in snap.ckpts:
        kind = "being written" if c.writing else "resumable" if c.resumable else "weights only"
        grid.add_row("", f"{c.name}  {human_bytes(c.size):>9}  {kind:<13}  {ago(now - c.mtime)}")
    for other in snap.others:
        grid.add_row("also here", escape(other))
    parts = [Text.from_markup(f"[bold]lmforge monitor[/] · {escape(str(snap.folder))}   "
                              f"[dim]{datetime.fromtimestamp(now):%H:%M:%S}[/]"), grid]
    if t.sample:
        lines = t.sample[1].splitlines() or [""]
        shown = "\n".join(lines[:12]) + (f"\n… ({len(lines) - 12} more lines)" if len(lines) > 12 else "")
        parts += [Text.from_markup(f"[bold]sample[/] at step {t.sample[0]:,}:"), Text(shown, style="cyan")]
    return Group(*parts)


def _when(value) -> float | None:
    """A lock's `started`: unix seconds or an ISO 8601 string."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value).timestamp()
        except ValueError:
            return None
    return None


def cmd_monitor(argv: list[str]) -> int:
    p = CommandParser("monitor", "Watch a run (or a stage folder such as RUN/sft): latest metrics, ETA, "
                      "checkpoints, the last sample, and whether the training process is alive. Reads files "
                      "only, so it works from any machine that sees the folder. Ctrl-C stops it.")
    p.add_argument("run", metavar="RUN", help="run folder or stage folder")
    p.add_argument("--once", action="store_true", help="print one snapshot and exit")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes (default 2)")
    a = p.parse_args(argv)
    folder, others = pick_folder(Path(a.run))
    tail = MetricsTail(folder / "metrics.jsonl")
    console = Console(highlight=False)
    if a.once or not console.is_terminal:  # a pipe or a log gets one snapshot, without padding
        if not console.is_terminal:
            console = Console(highlight=False, width=max(console.width, 120))
        with console.capture() as out:
            console.print(render(take_snapshot(folder, tail, others)))
        sys.stdout.write("".join(line.rstrip() + "\n" for line in out.get().splitlines()))
        return 0
    from rich.live import Live

    try:
        with Live(render(take_snapshot(folder, tail, others)), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(max(0.2, a.interval))
                folder_now, others = pick_folder(Path(a.run))
                if folder_now != folder:  # a later stage started writing
                    folder, tail = folder_now, MetricsTail(folder_now / "metrics.jsonl")
                live.update(render(take_snapshot(folder, tail, others)), refresh=True)
    except KeyboardInterrupt:
        return 0
