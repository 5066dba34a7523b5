"""What keeps a run's output folder consistent: one writer at a time, one run per folder, a config that
a plain restart can trust.

- `RunLock`: an advisory lock (flock) on `<out_dir>/lmforge.lock`, held by the one process writing
  there (rank 0 under torchrun). The file holds JSON {"pid", "host", "started", "command"}, which
  `lmforge monitor` reads; a killed holder's lock is released by the kernel, so a stale file never
  blocks anyone. `lock_holder` says who holds it, if anyone.
- `remembered`: the config written to RUN/lmforge.yaml, without the one-shot switches (a fresh start,
  a resume or init path already used), so `lmforge pretrain run_dir=RUN` after a crash continues.
- `Aside`: a fresh start (or a resume from an earlier checkpoint) moves what it would mix with to
  `RUN/previous/<time>/` (the run's layout kept: `checkpoints/`, `sft/checkpoints/`, `eval/...`) and
  puts it back if the new run fails before its first step.
- `RunFolder`: the three together, as the training loop uses them (rank 0 only).
"""

from __future__ import annotations

import copy
import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from lmforge.config import Config, save_config
from lmforge.console import log
from lmforge.errors import LmforgeError
from lmforge.io import atomic_write_json, fsync_dir, pid_alive

LOCK_FILE = "lmforge.lock"
PREVIOUS = "previous"
MANIFEST = "moved.json"


# --- the lock ---------------------------------------------------------------------------------------

def _command() -> list[str]:
    argv = list(sys.argv)
    if argv and (argv[0].endswith(os.path.join("lmforge", "__main__.py")) or Path(argv[0]).name == "lmforge"):
        argv[0] = "lmforge"
    return argv


class RunLock:
    """`with RunLock(folder):` -> this process is the only one writing `folder`, or an LmforgeError naming
    the process that is. `enabled=False` (ranks other than 0) takes nothing."""

    def __init__(self, folder: str | Path, enabled: bool = True):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.enabled = enabled
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        if not self.enabled or self.fd is not None:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        for attempt in range(20):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if attempt < 5:  # a `lock_holder` peek holds a shared lock for microseconds
                    time.sleep(0.05)
                    continue
                raise LmforgeError(self._busy_message()) from None
            # A holder deletes the file when it lets go; if that happened between our open and flock,
            # we locked a deleted file and must start again on the new one.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            info = {"pid": os.getpid(), "host": socket.gethostname(), "started": round(time.time(), 3),
                    "command": _command()}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info, ensure_ascii=False) + "\n").encode("utf-8"), 0)
            os.fsync(fd)
            self.fd = fd
            return self
        raise LmforgeError(f"{self.path}: could not take the lock (the file keeps being replaced)")

    def _busy_message(self) -> str:
        holder = read_lock_file(self.folder)
        if not holder:
            return (f"{self.folder} is in use by another lmforge process (its lock {self.path} is held); "
                    "wait for it to finish or stop it")
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
        command = " ".join(holder.get("command") or [])
        return (f"{self.folder} is in use by another run: pid {holder.get('pid')} on host {holder.get('host')}, "
                f"started {started}" + (f" (`{command}`)" if command else "")
                + f". Wait for it to finish or stop that process: two processes writing one run would "
                f"interleave its checkpoints, metrics or data (lock: {self.path})")

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            # Deleted while still held, so no process can take the old file after we let go.
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def read_lock_file(folder: str | Path) -> dict:
    """The JSON in `<folder>/lmforge.lock`, {} if there is none (or it is being written)."""
    try:
        data = json.loads((Path(folder) / LOCK_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def lock_held(path: str | Path) -> bool | None:
    """True if some process holds the flock on `path`, False if none does, None if it cannot be told.

    A shared, non-blocking probe: it never waits and is released at once, so the only process it
    can disturb is a trainer starting in that same microsecond (its own non-blocking lock would fail).
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # e.g. a network filesystem without locks
        return None
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def lock_holder(folder: str | Path) -> dict | None:
    """Who is writing `folder` now: the lock file's JSON while a live process holds the lock, else None.

    Works from another process (or another machine on a filesystem with working flock, NFS included):
    a killed holder's lock is gone even if its file stayed. A lock that cannot be probed counts as held.
    """
    path = Path(folder) / LOCK_FILE
    if not path.is_file() or lock_held(path) is False:
        return None
    return read_lock_file(folder) or {"pid": None, "host": None, "started": None, "command": []}


# --- the remembered config ----------------------------------------------------------------------------

def remembered(cfg: Config, has_checkpoint: bool) -> Config:
    """The config a plain `lmforge <stage> run_dir=RUN` should continue with.

    `train.resume` becomes auto: a fresh start (none) is done once, and a resume path, once this run has
    a checkpoint of its own, has served its purpose; so has `train.init_from`. Before the first
    checkpoint a resume/init path stays, so a restart after an early crash starts from the same place.
    """
    out = copy.deepcopy(cfg)
    if has_checkpoint or out.train.resume in ("none", ""):
        out.train.resume = "auto"
    if has_checkpoint:
        out.train.init_from = ""
    return out


class RunConfig:
    """RUN/lmforge.yaml, written once a run has started (a command that fails earlier leaves it as it was)."""

    def __init__(self, cfg: Config, path: str | Path | None):
        self.cfg, self.path = cfg, Path(path) if path else None
        self.one_shot_left = False

    def write(self, has_checkpoint: bool) -> None:
        if self.path is None:
            return
        out = remembered(self.cfg, has_checkpoint)
        save_config(out, self.path)
        self.one_shot_left = bool(out.train.init_from) or out.train.resume != "auto"


# --- moving an earlier run aside ---------------------------------------------------------------------

def _stamp(parent: Path) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name, n = stamp, 1
    while (parent / name).exists():
        name, n = f"{stamp}-{n}", n + 1
    return name


class Aside:
    """Moves files of an earlier run out of the run folder `root` into `root/previous/<time>/`, keeping
    their paths relative to root, with a `moved.json` saying what and why.

    The move is staged in a hidden `previous/.<time>.tmp-PID` folder whose manifest is written first, so
    a move interrupted by a kill is finished by the next run in the folder (`finish_interrupted`).
    `undo()` puts everything back (the new run failed before it trained a step).
    """

    def __init__(self, root: str | Path, move: list[Path], copy_: list[Path] = (), reason: str = ""):
        self.root = Path(root)
        self.move = [_relative(p, self.root) for p in move]
        self.copy = [_relative(p, self.root) for p in copy_]
        self.reason = reason
        self.dest: Path | None = None

    def run(self) -> Path | None:
        if not self.move and not self.copy:
            return None
        previous = self.root / PREVIOUS
        previous.mkdir(parents=True, exist_ok=True)
        final = previous / _stamp(previous)
        staging = previous / f".{final.name}.tmp-{os.getpid()}"
        staging.mkdir()
        manifest = {"reason": self.reason, "time": round(time.time(), 3), "command": _command(),
                    "final": final.name, "moved": [str(p) for p in self.move], "copied": [str(p) for p in self.copy]}
        atomic_write_json(staging / MANIFEST, manifest)  # before anything moves: a kill from here on is finished later
        _transfer(self.root, staging, manifest)
        final = _rename_free(staging, final)
        fsync_dir(previous)
        self.dest = final
        log(f"[yellow]{self.reason}[/]: moved {_summary(self.move + self.copy)} of the earlier run to {final}")
        return final

    def undo(self) -> None:
        """Put the moved files back, replacing what the failed new run wrote in their place."""
        if self.dest is None:
            return
        for rel in self.move + self.copy:
            src, dst = self.dest / rel, self.root / rel
            if not src.exists():
                continue
            if dst.is_dir():
                shutil.rmtree(dst)
            elif dst.exists():
                dst.unlink()
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
        shutil.rmtree(self.dest, ignore_errors=True)
        try:
            (self.root / PREVIOUS).rmdir()  # only if nothing else was ever moved aside
        except OSError:
            pass
        log(f"[yellow]the new run failed before its first step[/]: put the earlier run's files back from "
            f"{self.dest}")
        self.dest = None


def _rename_free(src: Path, dst: Path) -> Path:
    """Rename src to dst, or to a fresh time-stamped name beside it if dst is taken (another stage of
    the run set its files aside in the same second)."""
    for _ in range(100):
        if not dst.exists():
            try:
                os.replace(src, dst)
                return dst
            except OSError:
                if not dst.exists():
                    raise
        dst = dst.parent / _stamp(dst.parent)
    raise LmforgeError(f"{src}: no free name for it in {dst.parent}")


def _relative(path: str | Path, root: Path) -> Path:
    return Path(path).resolve().relative_to(root.resolve())


def _summary(paths: list[Path]) -> str:
    """`checkpoints/step_000002..step_000006 (3), metrics.jsonl, eval/x.json`: what moved, in one line."""
    groups: dict[str, list[str]] = {}
    for p in paths:
        key = str(p.parent) if p.name.startswith("step_") else str(p)
        groups.setdefault(key, []).append(p.name)
    parts = []
    for key, names in groups.items():
        if len(names) == 1 and not names[0].startswith("step_"):
            parts.append(key)
        else:
            names = sorted(set(names))
            parts.append(f"{key}/{names[0]}" + (f"..{names[-1]} ({len(names)})" if len(names) > 1 else ""))
    return ", ".join(parts)


def eval_results_of(root: str | Path, checkpoints: list[Path]) -> list[Path]:
    """The `RUN/eval/*.json` results of these checkpoints (each says which one in its "checkpoint" field)."""
    wanted = {Path(c).resolve() for c in checkpoints}
    out = []
    for f in sorted((Path(root) / "eval").glob("*.json")) if wanted else []:
        try:
            ckpt = json.loads(f.read_text(encoding="utf-8")).get("checkpoint")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(ckpt, str) and Path(ckpt).resolve() in wanted:
            out.append(f)
    return out


def _transfer(root: Path, staging: Path, manifest: dict) -> None:
    """Copy, then move, what `manifest` lists that is still in root (a second pass finishes a first)."""
    for rel in manifest["copied"]:
        src = root / rel
        if src.is_file():
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, staging / rel)
    for rel in manifest["moved"]:
        src = root / rel
        if src.exists() and not (staging / rel).exists():
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, staging / rel)


def finish_interrupted(root: str | Path) -> None:
    """Finish moves aside that killed processes left half done in `root/previous/`."""
    previous = Path(root) / PREVIOUS
    if not previous.is_dir():
        return
    for staging in sorted(previous.glob(".*.tmp-*")):
        pid = staging.name.rpartition(".tmp-")[2]
        if pid.isdigit() and int(pid) != os.getpid() and pid_alive(int(pid)):
            continue  # another stage of this run moving its own files right now
        try:
            manifest = json.loads((staging / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            shutil.rmtree(staging, ignore_errors=True)  # killed before its manifest existed: nothing moved yet
            continue
        _transfer(Path(root), staging, manifest)
        final = _rename_free(staging, previous / manifest.get("final", _stamp(previous)))
        log(f"finished moving an interrupted run's files aside to {final}")


# --- the output folder of one training run ----------------------------------------------------------

class RunFolder:
    """A training run's output folder as the loop uses it: locked while it runs, the earlier run set aside
    when this one would mix with it (and put back if this one fails before its first step), and the run
    config written once the first step has trained. Only rank 0 (`enabled`) touches the folder."""

    def __init__(self, out_dir: str | Path, cfg: Config, config_path: str | Path | None, enabled: bool = True):
        self.out_dir, self.enabled = Path(out_dir), enabled
        # what is set aside goes to RUN/previous, also for a stage's folder RUN/<stage>
        inside = self.out_dir.resolve().is_relative_to(cfg.run_path.resolve())
        self.root = cfg.run_path if inside else self.out_dir
        self.run_lock = RunLock(self.out_dir, enabled)
        self.config = RunConfig(cfg, config_path if enabled else None)
        self.aside: Aside | None = None
        self.trained = False

    def lock(self) -> str:
        """Take the lock and finish moves a killed run left half done; an error message, or "" on success."""
        if not self.enabled:
            return ""
        try:
            self.run_lock.acquire()
        except LmforgeError as e:
            return str(e)
        finish_interrupted(self.root)
        return ""

    def set_aside(self, move: list[Path], copy_: list[Path], reason: str) -> None:
        if self.enabled:
            self.aside = Aside(self.root, [p for p in move if p.exists()], [p for p in copy_ if p.exists()],
                               reason)
            self.aside.run()

    def started(self, has_checkpoint: bool) -> None:
        """The first step has trained: the run is real now."""
        self.trained = True
        self.aside = None
        self.config.write(has_checkpoint)

    def saved(self) -> None:
        """A checkpoint was written: a resume / init path kept in the config has done its job."""
        if self.config.one_shot_left:
            self.config.write(has_checkpoint=True)

    def failed(self) -> None:
        if self.aside is not None and not self.trained:
            self.aside.undo()
            self.aside = None

    def release(self) -> None:
        self.run_lock.release()
