"""Read documents from files, folders and globs: plain text, code, JSONL, JSON, CSV, Parquet, Arrow,
`datasets` folders and (named only) Hub datasets, .gz/.zst; columnar formats in `lmforge.data.columns`.

One function owns every input format, so the tokenizer trainer and `prepare` see the same
documents in the same order. Order is deterministic: sources as listed, folders walked sorted.
Problems are errors that name the file (and line and field), because a silently skipped file is a
hole in the corpus nobody notices. The one exception is binary files met while walking a folder:
folders often hold a stray image or archive, so those are skipped and counted.

What a document is (`data.max_doc_bytes`, 32 KiB by default; 0 turns the limit off):

- A text or code file up to that size is one document: a folder of source files or of short texts
  gives one document per file.
- A longer file is cut into documents of at most that size by `lmforge.data.documents`: at the
  last paragraph break (a blank line) that leaves the document at least half full, else between
  lines, and inside a single line longer than the limit (minified code, Chinese prose without line
  breaks) after its last space or punctuation mark. A 5 MB book with one sentence per line becomes
  about 160 documents, so train and validation both exist and an end-of-text token comes every
  ~8k tokens, not after every sentence; a huge code file is cut between functions, at blank lines.
- A record (JSONL line, JSON item, CSV row, Parquet row) is one document, cut the same way when it
  is longer than the limit.
The pieces joined are exactly the file's text; nothing is dropped or added.

Files are streamed, whatever their size: text, JSONL and CSV a line or a MiB at a time (UTF-16/32
too), Parquet and Arrow a record batch at a time. Three cases are read whole because their format
needs it: a .json file (one JSON value; use JSON Lines for large corpora), a .gz/.zst-wrapped
Parquet file and a .gz/.zst-wrapped Arrow file in the IPC file format (both need random access).

How bytes become text (UTF-8, a detected CJK legacy encoding, or UTF-8 with stray bytes replaced
and a warning) is one rule per file, in `lmforge.data.encoding`; `SourceStats.decoding` records it.
"""

from __future__ import annotations

import csv
import glob
import gzip
import hashlib
import io
import json
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import zstandard
from rich.markup import escape

from lmforge.config import DataConfig
from lmforge.console import log
from lmforge.data.columns import HUB_PREFIX, RowFilter, hf_folder_files, read_columnar, read_hub
from lmforge.data.documents import split_text, utf8_size
from lmforge.data.encoding import SAMPLE_BYTES, BinaryFileError, Decoding, choose_encoding, warning
from lmforge.errors import LmforgeError

TEXT_EXTS = {
    ".txt", ".text", ".md", ".markdown", ".rst", ".org", ".adoc", ".tex", ".html", ".htm", ".xml",
    ".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".cxx", ".hpp", ".hh", ".cu", ".cuh",
    ".java", ".kt", ".scala", ".go", ".rs", ".swift", ".m", ".mm", ".cs", ".js", ".mjs", ".ts",
    ".tsx", ".jsx", ".vue", ".rb", ".php", ".pl", ".lua", ".r", ".jl", ".hs", ".ml", ".ex", ".exs",
    ".erl", ".clj", ".dart", ".zig", ".nim", ".sh", ".bash", ".zsh", ".ps1", ".bat", ".sql",
    ".css", ".scss", ".yaml", ".yml", ".toml", ".ini", ".cfg", ".cmake", ".mk", ".proto", ".s", ".asm",
}
COLUMNAR_EXTS = {".parquet", ".arrow"}  # Parquet, Arrow IPC (what `datasets` writes): lmforge.data.columns
RECORD_EXTS = {".jsonl", ".ndjson", ".json", ".csv", *COLUMNAR_EXTS}
COMPRESSED_EXTS = {".gz", ".zst", ".zstd"}
MIN_DOC_BYTES = 1024  # smallest data.max_doc_bytes: below it, documents would be shorter than a context


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
    decoding: list[dict] = field(default_factory=list)  # Decoding.as_dict() of files not clean UTF-8


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
    sources = [s.get("path", "") if isinstance(s, dict) else s for s in sources]  # a mixture's entries
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
        if str(s).startswith(HUB_PREFIX):  # a Hub dataset, streamed by read_file
            out.append((Path(s), True))
        elif p.is_file():
            add(p, True)
        elif p.is_dir() and (hf := hf_folder_files(p)) is not None:
            for f in hf:
                add(f, True)
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


def _decode_whole(path: Path, data: bytes, decodings: list[Decoding]) -> str:
    """A whole file's bytes as text (formats parsed whole, like .json), by the encoding rule."""
    dec = choose_encoding(path, data[:SAMPLE_BYTES], complete=len(data) <= SAMPLE_BYTES)
    decodings.append(dec)
    text = dec.decode(data, 0)
    if "\x00" in text:  # NULs past the sampled start
        raise BinaryFileError(f"{path}: binary file (contains NUL characters), not text")
    return text


def _split_lines(text: str) -> Iterator[str]:
    """`text` in lines that keep their "\n", as reading a file gives them (no split at \r or U+2028)."""
    start = 0
    while start < len(text):
        end = text.find("\n", start)
        end = len(text) if end < 0 else end + 1
        yield text[start:end]
        start = end


def _decoded(path: Path, decodings: list[Decoding], by_line: bool) -> Iterator[str]:
    """A file's text, streamed line by line or in chunks of about 1 MiB that end at a line end.

    The encoding is chosen from the first MiB (`lmforge.data.encoding`); its record goes to `decodings`.
    """
    with _open(path) as raw, io.BufferedReader(raw, buffer_size=SAMPLE_BYTES) as f:
        try:
            dec = choose_encoding(path, f.peek(SAMPLE_BYTES)[:SAMPLE_BYTES], complete=False)
            decodings.append(dec)
            if dec.encoding in ("utf-16", "utf-32"):  # b"\n" may sit inside a character: decode, then cut
                yield from _wide_lines(f, dec, by_line)
                return
            offset, line = 0, 1
            while data := f.readline() if by_line else f.read(SAMPLE_BYTES) + f.readline():
                text = dec.decode(data, offset)  # b"\n" never occurs inside a character here
                offset += len(data)
                if "\x00" in text:  # past the sampled start, where a NUL means a binary file
                    at = line + text.count("\n", 0, text.index("\x00"))
                    raise LmforgeError(f"{path}:{at}: NUL character in a text file; is it binary?")
                line += text.count("\n")
                yield text
        except _READ_ERRORS as e:
            raise LmforgeError(f"{path}: cannot read ({e})") from None


def _wide_lines(f: BinaryIO, dec: Decoding, by_line: bool) -> Iterator[str]:
    """A UTF-16/32 file decoded a MiB at a time and handed on in lines, or in chunks that end at a line end."""
    feed, rest, offset = dec.incremental(), "", 0
    while True:
        data = f.read(SAMPLE_BYTES)
        text = rest + feed(data, offset, final=not data)
        offset += len(data)
        cut = text.rfind("\n") + 1 if data else len(text)
        text, rest = text[:cut], text[cut:]
        if text:
            yield from _split_lines(text) if by_line else [text]
        if not data:
            return


def _lines(path: Path, decodings: list[Decoding]) -> Iterator[tuple[int, str]]:
    """(line number, text) of a line-oriented file (JSONL, CSV)."""
    return enumerate(_decoded(path, decodings, by_line=True), 1)


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


def _read_jsonl(path: Path, field: str, decodings: list[Decoding]) -> Iterator[Document]:
    for n, line in _lines(path, decodings):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise LmforgeError(f"{path}:{n}: invalid JSON: {e.msg} (column {e.colno})") from None
        text = _field(path, str(n), obj, field)
        if text is not None:
            yield Document(text, str(path), n)


def _read_json(path: Path, field: str, decodings: list[Decoding]) -> Iterator[Document]:
    text = _decode_whole(path, _read_all(path), decodings)
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


def _read_csv(path: Path, field: str, decodings: list[Decoding]) -> Iterator[Document]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # documents are longer than csv's 128 KB default
    rows = (line for _, line in _lines(path, decodings))
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


def _read_columnar(path: Path, field: str, row_filter: RowFilter | None) -> Iterator[Document]:
    ext, comp = _kind(path)
    for row, text in read_columnar(path, ext, field, row_filter, (lambda: _open(path)) if comp else None):
        yield Document(text, str(path), row)


def _bounded(doc: Document, limit: int) -> Iterator[Document]:
    """A record as it is, or as several documents when it is longer than `limit` (each keeps its line)."""
    if not limit or len(doc.text) <= limit // 4 or utf8_size(doc.text) <= limit:
        yield doc
        return
    for _, text in split_text([doc.text], limit):
        yield Document(text, doc.source, doc.line)


def read_file(path: Path, text_field: str = "text", max_doc_bytes: int = DataConfig.max_doc_bytes,
              decodings: list[Decoding] | None = None, row_filter: RowFilter | None = None) -> Iterator[Document]:
    """Documents of one file, by extension, none longer than `max_doc_bytes` (0: no limit).

    A text or code file is one document, or several when it is longer (see the module docstring);
    a record format gives a document per record, split the same way when a record is longer.
    `decodings` receives how the file's bytes were decoded.
    """
    decodings = decodings if decodings is not None else []
    if str(path).startswith(HUB_PREFIX):
        for row, text in read_hub(str(path), text_field, row_filter):
            yield from _bounded(Document(text, str(path), row), max_doc_bytes)
        return
    ext, _ = _kind(path)
    readers = {".jsonl": _read_jsonl, ".ndjson": _read_jsonl, ".json": _read_json, ".csv": _read_csv}
    if row_filter is not None and ext not in COLUMNAR_EXTS:
        raise LmforgeError(f"{path}: data.filter ({row_filter.spec}) applies to columnar sources only "
                           f"({', '.join(sorted(COLUMNAR_EXTS))}, datasets folders); unset it for this file")
    if ext in readers or ext in COLUMNAR_EXTS:
        records = (readers[ext](path, text_field, decodings) if ext in readers
                   else _read_columnar(path, text_field, row_filter))
        for doc in records:
            yield from _bounded(doc, max_doc_bytes)
    else:
        for n, text in split_text(_decoded(path, decodings, by_line=False), max_doc_bytes):
            yield Document(text, str(path), n)


_warned: set[tuple[str, int]] = set()  # (file, bad bytes) already reported by this process
_SHOWN = 5  # decoding notes of each kind printed one by one per read of the sources; the rest are counted


def _report(decodings: list[Decoding], stats: SourceStats, notes: Counter) -> None:
    """Record how files were decoded; say so once per file and process (tokenizer and prepare both read it)."""
    for dec in decodings:
        if dec.clean:
            continue
        stats.decoding.append(dec.as_dict())
        key = (dec.file, dec.replaced_bytes)
        if key in _warned:
            continue
        _warned.add(key)
        kind = "replaced" if dec.replaced_bytes else dec.encoding
        notes[kind] += 1
        if notes[kind] > _SHOWN:
            continue
        if dec.replaced_bytes:
            log(f"[yellow]WARNING[/yellow] {escape(warning(dec))}")
        else:
            log(escape(f"{dec.file}: decoded as {dec.encoding}"))


def _report_rest(notes: Counter) -> None:
    for kind, n in notes.items():
        if n > _SHOWN:
            what = "had bytes replaced" if kind == "replaced" else f"were decoded as {kind}"
            warn = "[yellow]WARNING[/yellow] " if kind == "replaced" else ""
            log(f"{warn}... and {n - _SHOWN} more file(s) {what} (the data manifest's 'decoding' lists each)")


def iter_documents(sources: list[str], text_field: str = "text", stats: SourceStats | None = None,
                   max_doc_bytes: int = DataConfig.max_doc_bytes, row_filter: str = "") -> Iterator[Document]:
    """Every non-empty document of `sources`, in a deterministic order, none over `max_doc_bytes`.

    Binary files named explicitly are errors; those found by walking a folder or a glob are
    skipped, counted in `stats.skipped_files` and reported once at the end. How each file was
    decoded is in `stats.decoding` (files that were not clean UTF-8).
    """
    yield from read_files(resolve_sources(sources), text_field, stats, max_doc_bytes, row_filter)


def read_files(files: list[tuple[Path, bool]], text_field: str = "text", stats: SourceStats | None = None,
               max_doc_bytes: int = DataConfig.max_doc_bytes, row_filter: str = "") -> Iterator[Document]:
    """`iter_documents` of files already resolved, (path, strict) as `resolve_sources` gives them: a slice
    of a corpus reads exactly as it does inside the whole."""
    stats = stats if stats is not None else SourceStats()
    if max_doc_bytes and max_doc_bytes < MIN_DOC_BYTES:
        raise LmforgeError(f"data.max_doc_bytes must be 0 (no limit) or at least {MIN_DOC_BYTES}, "
                           f"got {max_doc_bytes}")
    keep = RowFilter(row_filter) if row_filter else None
    skipped: list[str] = []
    notes: Counter = Counter()
    for path, strict in files:
        decodings: list[Decoding] = []
        try:
            for doc in read_file(path, text_field, max_doc_bytes, decodings, keep):
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
        _report(decodings, stats, notes)
    _report_rest(notes)
    if skipped:
        shown = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        log(f"[yellow]skipped {len(skipped)} binary file(s): {shown}[/yellow]")
