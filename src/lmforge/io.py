"""Atomic file and folder writes.

Every artifact is written to a temporary path beside its destination, fsynced, then renamed into
place. A rename within one filesystem is atomic, so a reader (or a resume after a crash) sees
either the old artifact or the new one, never half of one.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

_UMASK = os.umask(0)
os.umask(_UMASK)


class DiskFullError(OSError):
    """Raised instead of a bare ENOSPC so the message says what was being written."""


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _explain(e: OSError, what: Path) -> OSError:
    if e.errno == errno.ENOSPC:
        return DiskFullError(errno.ENOSPC, f"no space left on device while writing {what}; "
                             "the previous artifact is untouched. Free some space and run again")
    return e


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)`, then fsync and rename tmp_path onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; artifacts get the usual permissions
    try:
        write(tmp_path)
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        fsync_dir(path.parent)
    except OSError as e:
        tmp_path.unlink(missing_ok=True)
        raise _explain(e, path) from e
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda p: p.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: object) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def read_json(path: str | Path, hint: str = "") -> object:
    """The parsed JSON file, or an LmforgeError naming the file, the parse error and `hint` (what to do)."""
    from lmforge.errors import LmforgeError

    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LmforgeError(f"{path}: not valid JSON ({e})" + (f"; {hint}" if hint else "")) from None


def json_lines(path: str | Path, lines: Iterable[str]) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) of each non-blank JSON Lines line; a bad line is `file:line: invalid JSON`.

    Every JSONL reader (corpora, chat and preference data, benchmarks) goes through here, so the
    message a user sees for a broken line is the same everywhere.
    """
    from lmforge.errors import LmforgeError

    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise LmforgeError(f"{path}:{n}: invalid JSON: {e.msg} (column {e.colno})") from None


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_tree(path: Path, before_delete: Callable[[Path], None] | None = None) -> None:
    """Delete a folder so that a kill at any moment leaves either all of it or nothing under its name.

    It is renamed to `.NAME.del-PID` first (a name no reader picks up), then deleted; a kill during
    the deletion leaves only that hidden folder, which `clear_leftovers` removes later.
    `before_delete(hidden_path)` runs between the two (fault injection in the crash tests).
    """
    hidden = path.parent / f".{path.name}.del-{os.getpid()}"
    shutil.rmtree(hidden, ignore_errors=True)
    os.replace(path, hidden)
    fsync_dir(path.parent)
    if before_delete is not None:
        before_delete(hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def clear_leftovers(parent: Path, names: str) -> None:
    """Clear what killed writers of folders matching `names` (a glob) in `parent` left behind.

    An AtomicDir writer killed mid-build leaves `.NAME.tmp-PID`; one killed between its two renames
    leaves `.NAME.old-PID` and no NAME, and that old copy is the last complete version, so it goes
    back. Folders of writers that are still running are left alone. A `remove_tree` killed while
    deleting leaves `.NAME.del-PID`: garbage whoever made it, removed always.
    """
    for p in parent.glob(f".{names}.del-*"):
        shutil.rmtree(p, ignore_errors=True)
    for kind in ("tmp", "old"):
        for p in parent.glob(f".{names}.{kind}-*"):
            name, _, pid = p.name[1:].rpartition(f".{kind}-")
            if not pid.isdigit() or int(pid) == os.getpid() or pid_alive(int(pid)):
                continue
            final = parent / name
            if kind == "old" and not final.exists():
                os.replace(p, final)
            else:
                shutil.rmtree(p, ignore_errors=True)


class AtomicDir:
    """Build a folder under a temporary name and rename it into place on success.

    `with AtomicDir(final) as tmp: write files into tmp`. On an exception the temporary folder is
    removed and `final` is untouched; on success, every file is fsynced before the rename.
    """

    def __init__(self, final: str | Path, tag: str | None = None):
        """tag: the temporary name's suffix (default: this pid); processes that write one folder together
        share the main one's."""
        self.final = Path(final)
        self.tmp = self.final.parent / f".{self.final.name}.tmp-{tag or os.getpid()}"

    def __enter__(self) -> Path:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        clear_leftovers(self.final.parent, glob.escape(self.final.name))
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if isinstance(exc, OSError) and not isinstance(exc, DiskFullError):
                explained = _explain(exc, self.final)
                if explained is not exc:
                    raise explained from exc
            return False
        try:
            for p in self.tmp.rglob("*"):
                if p.is_file():
                    with open(p, "rb") as f:
                        os.fsync(f.fileno())
            fsync_dir(self.tmp)
            if self.final.exists():
                old = self.final.parent / f".{self.final.name}.old-{os.getpid()}"
                os.replace(self.final, old)
                os.replace(self.tmp, self.final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(self.tmp, self.final)
            fsync_dir(self.final.parent)
        except OSError as e:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise _explain(e, self.final) from e
        return False
