"""Read documents from files, folders and globs: plain text, code, JSONL, JSON, CSV, Parquet, .gz/.zst.

One function owns every input format, so the tokenizer trainer and `prepare` see the same
documents in the same order. Order is deterministic: sources as listed, folders walked sorted.
Problems are errors that name the file (and line and field), because a silently skipped file is a
hole in the corpus nobody notices. The one exception is binary files met while walking a folder:
folders often hold a stray image or archive, so those are skipped and counted.
"""

from __future__ import annotations

import codecs
import csv
import glob
import gzip
import hashlib
import io
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import zstandard

from lmforge.console import log
from lmforge.errors import LmforgeError

TEXT_EXTS = {
    ".txt", ".text", ".md", ".markdown", ".rst", ".org", ".adoc", ".tex", ".html", ".htm", ".xml",
    ".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".cxx", ".hpp", ".hh", ".cu", ".cuh",
    ".java", ".kt", ".scala", ".go", ".rs", ".swift", ".m", ".mm", ".cs", ".js", ".mjs", ".ts",
    ".tsx", ".jsx", ".vue", ".rb", ".php", ".pl", ".lua", ".r", ".jl", ".hs", ".ml", ".ex", ".exs",
    ".erl", ".clj", ".dart", ".zig", ".nim", ".sh", ".bash", ".zsh", ".ps1", ".bat", ".sql",
    ".css", ".scss", ".yaml", ".yml", ".toml", ".ini", ".cfg", ".cmake", ".mk", ".proto", ".s", ".asm",
}
RECORD_EXTS = {".jsonl", ".ndjson", ".json", ".csv", ".parquet"}
COMPRESSED_EXTS = {".gz", ".zst", ".zstd"}
_SNIFF = 1 << 16  # bytes looked at to tell text from binary and to guess an encoding


@dataclass
class Document:
    text: str
    source: str  # file path
    line: int  # 1-based line (JSONL, CSV), item (JSON array) or row (Parquet); 1 for whole-file text


@dataclass
class SourceStats:
    """Counters filled while iterating, for reports and manifests."""

    files: int = 0
    skipped_files: int = 0
    documents: int = 0


def text_key(text: str | bytes) -> bytes:
    """16-byte digest of a document's text: dedup key and the seed of every deterministic split."""
    data = text.encode("utf-8") if isinstance(text, str) else text
    return hashlib.blake2b(data, digest_size=16).digest()


def key_fraction(key: bytes) -> float:
    """Map a digest to [0, 1): `key_fraction(k) < f` selects a stable fraction f of documents."""
    return int.from_bytes(key[:8], "big") / 2.0**64


def text_fraction(text: str) -> float:
    return key_fraction(text_key(text))


def _kind(path: Path) -> tuple[str, str]:
    """(base extension, compression) from a file name, e.g. data.jsonl.zst -> (".jsonl", ".zst")."""
    suffixes = [s.lower() for s in path.suffixes]
    comp = suffixes.pop() if suffixes and suffixes[-1] in COMPRESSED_EXTS else ""
    return (suffixes[-1] if suffixes else ""), comp


def _known(path: Path) -> bool:
    ext, _ = _kind(path)
    return ext in TEXT_EXTS or ext in RECORD_EXTS


def resolve_sources(sources: list[str]) -> list[tuple[Path, bool]]:
    """Expand sources to (file, strict) in reading order; strict = named explicitly by the user.

    Folders are walked recursively in sorted order, taking only known extensions and skipping hidden
    entries (.git and the like). Glob matches are taken whatever their extension (the pattern already
    chose them). A file reached twice is read once.
    """
    if isinstance(sources, str | Path):
        sources = [str(sources)]
    out: list[tuple[Path, bool]] = []
    seen: set[Path] = set()

    def add(p: Path, strict: bool) -> None:
        r = p.resolve()
        if r not in seen:
            seen.add(r)
            out.append((p, strict))

    def walk(d: Path) -> int:
        n = 0
        for p in sorted(d.rglob("*"), key=lambda q: q.relative_to(d).as_posix()):
            rel = p.relative_to(d).parts
            if any(part.startswith(".") for part in rel) or not p.is_file() or not _known(p):
                continue
            add(p, False)
            n += 1
        return n

    for s in sources:
        p = Path(s).expanduser()
        if p.is_file():
            add(p, True)
        elif p.is_dir():
            if walk(p) == 0:
                raise LmforgeError(f"source '{s}': folder holds no files with a known extension "
                                   f"(text/code, {', '.join(sorted(RECORD_EXTS))}, optionally .gz/.zst)")
        elif glob.has_magic(s):
            matches = sorted(glob.glob(str(p), recursive=True))
            if not matches:
                raise LmforgeError(f"source '{s}' matches no files")
            for m in matches:
                mp = Path(m)
                if mp.is_file():
                    add(mp, False)
                elif mp.is_dir():
                    walk(mp)
        elif p.exists():
            raise LmforgeError(f"source '{s}' is neither a file nor a folder")
        else:
            parent = next((q for q in p.parents if q.exists()), None)
            hint = f" (folder {p.parent} does not exist)" if parent != p.parent else ""
            raise LmforgeError(f"source not found: '{s}'{hint}")
    return out


def count_source_bytes(sources: list[str]) -> int:
    """Rough size of the text behind `sources`, for progress bars and sampling rates.

    Compressed files count 4x their size on disk (a typical text ratio); it is an estimate only.
    """
    total = 0
    for p, _ in resolve_sources(sources):
        try:
            n = p.stat().st_size
        except OSError:
            continue
        total += n * 4 if _kind(p)[1] else n
    return total


def _open(path: Path) -> BinaryIO:
    """Open a file for reading bytes, decompressing .gz/.zst; errors name the file."""
    comp = _kind(path)[1]
    try:
        if comp == ".gz":
            return gzip.open(path, "rb")  # type: ignore[return-value]
        f = open(path, "rb", buffering=0)  # raw: callers add the buffering they need
    except PermissionError:
        raise LmforgeError(f"{path}: permission denied; cannot read this source file") from None
    except OSError as e:
        raise LmforgeError(f"{path}: cannot open ({e.strerror or e})") from None
    if comp in (".zst", ".zstd"):
        return _ZstdReader(f)  # type: ignore[return-value]
    return f


class _ZstdReader(io.RawIOBase):
    """Streaming .zst reader over concatenated frames that raises on a truncated file.

    zstandard's own stream_reader returns a short read at a cut-off frame, which would silently drop
    the end of a corpus file.
    """

    def __init__(self, f: BinaryIO):
        self.f, self.buf, self.pending = f, b"", False
        self.d = zstandard.ZstdDecompressor().decompressobj()

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self.buf:
            chunk = self.f.read(1 << 20)
            if not chunk:
                if self.pending:
                    raise EOFError("compressed file ended before the end of its last zstd frame")
                return 0
            while chunk:
                if self.d.eof:  # next frame
                    self.d = zstandard.ZstdDecompressor().decompressobj()
                self.buf += self.d.decompress(chunk)
                chunk = self.d.unused_data if self.d.eof else b""
            self.pending = not self.d.eof
        n = min(len(b), len(self.buf))
        b[:n], self.buf = self.buf[:n], self.buf[n:]
        return n

    def close(self) -> None:
        self.f.close()
        super().close()


_READ_ERRORS = (OSError, EOFError, zstandard.ZstdError)  # I/O, truncated .gz, corrupt .zst


def _read_all(path: Path) -> bytes:
    with _open(path) as f:
        try:
            return f.read()
        except _READ_ERRORS as e:
            raise LmforgeError(f"{path}: cannot read ({e})") from None


class BinaryFileError(LmforgeError):
    """The file is not text (NUL bytes): an error when named, skipped when found by a walk."""


def _looks_gb(text: str) -> bool:
    """True if nearly every non-ASCII character is in GB2312, as in real Simplified Chinese text.

    Big5 or Latin-1 bytes often decode as *valid* GBK too, but land on rare characters outside the
    GB2312 set; this is what tells them apart, where charset-normalizer alone misreads short texts.
    """
    wide = [c for c in text if ord(c) > 127][:20000]
    if not wide:
        return False
    ok = 0
    for c in wide:
        try:
            c.encode("gb2312")
            ok += 1
        except UnicodeEncodeError:
            pass
    return ok >= 0.9 * len(wide)


def detect_encoding(path: Path, sample: bytes, complete: bool) -> str:
    """Pick the encoding of a file from its first bytes: BOM, UTF-8, GB18030, then charset-normalizer.

    `complete` says whether `sample` is the whole file (else its last character may be cut).
    Raises BinaryFileError for NUL bytes and LmforgeError when no encoding fits confidently.
    """
    for bom, enc in ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"),
                     (codecs.BOM_UTF16_BE, "utf-16")):
        if sample.startswith(bom):
            return enc
    if b"\x00" in sample[:_SNIFF]:
        raise BinaryFileError(f"{path}: binary file (contains NUL bytes), not text")
    try:
        codecs.getincrementaldecoder("utf-8")().decode(sample, final=complete)
        return "utf-8"
    except UnicodeDecodeError:
        pass
    try:  # GB18030 covers GBK and GB2312, the usual non-UTF-8 Chinese encodings
        text = codecs.getincrementaldecoder("gb18030")().decode(sample, final=complete)
        if _looks_gb(text):
            return "gb18030"
    except UnicodeDecodeError:
        pass
    from charset_normalizer import from_bytes

    best = from_bytes(sample).best()
    if best is None:
        raise LmforgeError(f"{path}: not UTF-8 and no other text encoding fits confidently; "
                           "convert it to UTF-8 (e.g. `iconv -f <encoding> -t utf-8`)")
    return best.encoding


def _decode_file(path: Path, data: bytes) -> str:
    enc = detect_encoding(path, data[:_SNIFF * 16], complete=len(data) <= _SNIFF * 16)
    try:
        text = data.decode(enc)
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise LmforgeError(f"{path}:{line}: not valid {enc} (guessed from the start of the file); "
                           "convert the file to UTF-8") from None
    if "\x00" in text:  # NULs past the sniffed start
        raise BinaryFileError(f"{path}: binary file (contains NUL characters), not text")
    if enc not in ("utf-8", "utf-8-sig"):
        log(f"[dim]{path}: decoded as {enc}[/dim]")
    return text


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a line-oriented file, streamed; encoding guessed from its start."""
    with _open(path) as raw, io.BufferedReader(raw, buffer_size=_SNIFF) as f:
        try:
            head = f.peek(_SNIFF)[:_SNIFF]
            enc = detect_encoding(path, head, complete=False)
            if enc.startswith("utf-16"):  # lines are not split on b"\n"; rare, so read whole
                try:
                    text = f.read().decode(enc)
                except UnicodeDecodeError:
                    raise LmforgeError(f"{path}: not valid {enc}; convert the file to UTF-8") from None
                yield from enumerate(text.splitlines(keepends=True), 1)
                return
            for n, line in enumerate(f, 1):
                try:
                    yield n, line.decode(enc)
                except UnicodeDecodeError:
                    raise LmforgeError(f"{path}:{n}: not valid {enc} (guessed from the start of the "
                                       "file); convert the file to UTF-8") from None
        except _READ_ERRORS as e:
            raise LmforgeError(f"{path}: cannot read ({e})") from None


def _field(path: Path, where: str, obj: object, field: str) -> str | None:
    if not isinstance(obj, dict):
        raise LmforgeError(f"{path}:{where}: expected a JSON object with field '{field}', "
                           f"got {type(obj).__name__}")
    if field not in obj:
        keys = ", ".join(map(str, obj)) or "none"
        raise LmforgeError(f"{path}:{where}: no field '{field}' (fields present: {keys}); "
                           "set data.text_field to the field that holds the text")
    value = obj[field]
    if value is None:
        return None
    if not isinstance(value, str):
        raise LmforgeError(f"{path}:{where}: field '{field}' is {type(value).__name__}, not a string")
    return value


def _read_jsonl(path: Path, field: str) -> Iterator[Document]:
    for n, line in _lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise LmforgeError(f"{path}:{n}: invalid JSON: {e.msg} (column {e.colno})") from None
        text = _field(path, str(n), obj, field)
        if text is not None:
            yield Document(text, str(path), n)


def _read_json(path: Path, field: str) -> Iterator[Document]:
    text = _decode_file(path, _read_all(path))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        hint = "; one object per line is JSON Lines: rename the file to .jsonl" if e.msg == "Extra data" else ""
        raise LmforgeError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno}){hint}") from None
    items = data if isinstance(data, list) else [data]
    for i, obj in enumerate(items, 1):
        value = _field(path, f" item {i}", obj, field)
        if value is not None:
            yield Document(value, str(path), i)


def _read_csv(path: Path, field: str) -> Iterator[Document]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # documents are longer than csv's 128 KB default
    rows = (line for _, line in _lines(path))
    reader = csv.reader(rows)
    try:
        header = next(reader, None)
        if header is None:
            return
        if field not in header:
            raise LmforgeError(f"{path}:1: no column '{field}' (columns: {', '.join(header) or 'none'}); "
                               "set data.text_field to the column that holds the text")
        col = header.index(field)
        while True:
            start = reader.line_num + 1  # a quoted field may span lines; report where the row starts
            row = next(reader, None)
            if row is None:
                break
            if col < len(row):
                yield Document(row[col], str(path), start)
    except csv.Error as e:
        raise LmforgeError(f"{path}:{reader.line_num}: invalid CSV: {e}") from None


def _read_parquet(path: Path, field: str) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        src = pa.BufferReader(_read_all(path)) if _kind(path)[1] else str(path)
        pf = pq.ParquetFile(src)
    except (pa.ArrowException, OSError) as e:
        raise LmforgeError(f"{path}: not a valid Parquet file ({e})") from None
    names = pf.schema_arrow.names
    if field not in names:
        raise LmforgeError(f"{path}: no column '{field}' (columns: {', '.join(names)}); "
                           "set data.text_field to the column that holds the text")
    row = 0
    for batch in pf.iter_batches(columns=[field], batch_size=4096):
        for value in batch.column(0).to_pylist():
            row += 1
            if value is not None:
                if not isinstance(value, str):
                    raise LmforgeError(f"{path}: row {row}: column '{field}' is "
                                       f"{type(value).__name__}, not text")
                yield Document(value, str(path), row)


def read_file(path: Path, text_field: str = "text") -> Iterator[Document]:
    """Documents of one file, by extension; anything not a record format is one text document."""
    ext, _ = _kind(path)
    if ext in (".jsonl", ".ndjson"):
        yield from _read_jsonl(path, text_field)
    elif ext == ".json":
        yield from _read_json(path, text_field)
    elif ext == ".csv":
        yield from _read_csv(path, text_field)
    elif ext == ".parquet":
        yield from _read_parquet(path, text_field)
    else:
        yield Document(_decode_file(path, _read_all(path)), str(path), 1)


def iter_documents(sources: list[str], text_field: str = "text",
                   stats: SourceStats | None = None) -> Iterator[Document]:
    """Every non-empty document of `sources`, in a deterministic order.

    Binary files named explicitly are errors; those found by walking a folder or a glob are
    skipped, counted in `stats.skipped_files` and reported once at the end.
    """
    stats = stats if stats is not None else SourceStats()
    files = resolve_sources(sources)
    skipped: list[str] = []
    for path, strict in files:
        try:
            for doc in read_file(path, text_field):
                if doc.text.strip():
                    stats.documents += 1
                    yield doc
        except BinaryFileError:
            if strict:
                raise
            skipped.append(str(path))
            stats.skipped_files += 1
            continue
        stats.files += 1
    if skipped:
        shown = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        log(f"[yellow]skipped {len(skipped)} binary file(s): {shown}[/yellow]")
