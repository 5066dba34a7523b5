"""How a source file's bytes become text: one rule per file, and a record of what was done.

The rule, decided from the file's first MiB (the whole file when it is smaller):

1. a byte-order mark names the encoding (UTF-8, UTF-16, UTF-32);
2. NUL bytes mean a binary file, not text;
3. valid UTF-8 is UTF-8;
4. real text in a legacy encoding is decoded as that encoding: the sample decodes without a
   single error in it and holds at least `LEGACY_MIN_CHARS` non-ASCII characters, which are
   - nearly all Chinese, Japanese or Korean script: the encoding is the one charset-normalizer names
     among GBK/GB18030, Big5, Shift-JIS, EUC-JP and EUC-KR (it tells EUC-KR and EUC-JP from GB2312,
     whose byte ranges they share); where it names none, as on a short text, GBK when nearly all
     the characters are common Simplified Chinese (GB2312);
   - or mostly letters of an alphabet that is not Latin (Cyrillic, Greek, Hebrew, Arabic, Thai),
     at least `ALPHABET_SHARE` of all letters: the single-byte code page charset-normalizer names
     (cp1251, KOI8-R, ISO-8859-7, cp1255, TIS-620, ...);
5. anything else is UTF-8 with each invalid byte sequence replaced by U+FFFD and a warning that
   names the file, the offset of the first bad byte and the number of bad bytes — unless bad bytes
   are more than `STRAY_LIMIT` of the sample (and more than `STRAY_MIN_BYTES`): that is text in
   an encoding we cannot tell, and an error asks for a conversion to UTF-8.

Code pages of Latin-script languages (cp1252, Latin-1, cp1250, ...) are never guessed: any byte
string decodes in every one of them and they differ only in a few accented letters, which
detectors get wrong (cp1252 curly quotes come back as cp852, Latin-1 as cp1250), so a guess would
put silent mojibake into the corpus. Such a file gives the warning (a few accented letters) or the
error (many), both naming the file; the error suggests the detector's guess for `iconv`.

Bytes past the sample that do not decode are replaced and counted the same way, so a bad line deep
in a JSONL file is a counted warning, not an error that stops the run.
"""

from __future__ import annotations

import codecs
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import LmforgeError

SAMPLE_BYTES = 1 << 20  # bytes of a file's start that decide its encoding
LEGACY_MIN_CHARS = 8  # fewer non-ASCII characters than this is never "real text" in a legacy encoding
STRAY_LIMIT = 0.01  # bad bytes above this fraction of the sample are not strays but another encoding
STRAY_MIN_BYTES = 16  # ... unless there are at most this many (a short file with a few stray bytes)
ALPHABET_SHARE = 0.05  # a non-Latin code page needs at least this share of the letters to be non-ASCII
GB_ENCODINGS = {"gb2312", "gbk", "gb18030", "hz"}
CJK_ENCODINGS = {"big5", "big5hkscs", "cp950", "shift_jis", "cp932", "shift_jis_2004", "shift_jisx0213",
                 "euc_jp", "euc_jis_2004", "euc_jisx0213", "euc_kr", "cp949", "johab"}


class BinaryFileError(LmforgeError):
    """The file is not text (NUL bytes): an error when named, skipped when found by a walk."""


@dataclass
class Decoding:
    """What was done to one file's bytes; the manifest lists those that were not clean UTF-8."""

    file: str
    encoding: str = "utf-8"
    replaced_bytes: int = 0  # bytes that did not decode and became U+FFFD
    first_bad_byte: int | None = None  # offset of the first of them (in the decompressed data)

    @property
    def clean(self) -> bool:
        return self.encoding == "utf-8" and not self.replaced_bytes

    def as_dict(self) -> dict:
        d = {"file": self.file, "encoding": self.encoding, "replaced_bytes": self.replaced_bytes}
        if self.first_bad_byte is not None:
            d["first_bad_byte"] = self.first_bad_byte
        return d

    def decode(self, data: bytes, offset: int, final: bool = True) -> str:
        """`data` (found at byte `offset` of the file) as text; bad sequences are replaced and counted."""
        try:
            return data.decode(self.encoding)
        except UnicodeDecodeError:
            pass
        token = _COUNTING.set((self, offset))
        try:
            if final:
                return data.decode(self.encoding, errors=_HANDLER)
            return codecs.getincrementaldecoder(self.encoding)(errors=_HANDLER).decode(data, final=False)
        finally:
            _COUNTING.reset(token)

    def incremental(self):
        """`feed(data, offset, final)`: this encoding decoded a piece at a time (a character may straddle
        two pieces), bad sequences replaced and counted as `decode` does."""
        decoder = codecs.getincrementaldecoder(self.encoding)(errors=_HANDLER)

        def feed(data: bytes, offset: int, final: bool = False) -> str:
            token = _COUNTING.set((self, offset))
            try:
                return decoder.decode(data, final)
            finally:
                _COUNTING.reset(token)

        return feed


_HANDLER = "lmforge-count"
_COUNTING: ContextVar[tuple[Decoding, int]] = ContextVar("_COUNTING")


def _replace_and_count(e: UnicodeError) -> tuple[str, int]:
    dec, offset = _COUNTING.get()
    if dec.first_bad_byte is None:
        dec.first_bad_byte = offset + e.start
    dec.replaced_bytes += e.end - e.start
    return "\ufffd", e.end


codecs.register_error(_HANDLER, _replace_and_count)


def _strict(sample: bytes, encoding: str, final: bool) -> str | None:
    try:
        return codecs.getincrementaldecoder(encoding)().decode(sample, final=final)
    except (UnicodeDecodeError, LookupError):
        return None


def _wide(text: str) -> list[str]:
    return [c for c in text if ord(c) > 127][:20000]


def _is_cjk(c: str) -> bool:
    """CJK punctuation, kana, Han, hangul and full-width forms: what real CJK legacy text is made of."""
    o = ord(c)
    return (0x2E80 <= o <= 0x9FFF or 0xAC00 <= o <= 0xD7AF or 0xF900 <= o <= 0xFAFF
            or 0xFF00 <= o <= 0xFFEF)


def _alphabet(c: str) -> bool:
    """Greek, Cyrillic, Hebrew, Arabic or Thai: scripts a single-byte code page is told by reliably."""
    o = ord(c)
    return 0x370 <= o <= 0x52F or 0x590 <= o <= 0x6FF or 0xE00 <= o <= 0xE7F


def _alphabet_text(sample: bytes, encoding: str, complete: bool) -> bool:
    """`sample` decodes in `encoding` to text written mostly in one of those alphabets (not stray bytes)."""
    text = _strict(sample, encoding, complete)
    if text is None:
        return False
    wide = _wide(text)
    letters = sum(c.isalpha() for c in text[:200_000])
    return (len(wide) >= LEGACY_MIN_CHARS and sum(map(_alphabet, wide)) >= 0.7 * len(wide)
            and sum(map(_alphabet, text[:200_000])) >= ALPHABET_SHARE * letters)


def _looks_gb(wide: list[str]) -> bool:
    """Nearly every non-ASCII character is in GB2312, as in real Simplified Chinese text.

    Big5, Shift-JIS or stray Latin-1 bytes often decode as *valid* GBK too, but land on rare
    characters outside the GB2312 set; that is what tells them apart.
    """
    ok = 0
    for c in wide:
        try:
            c.encode("gb2312")
            ok += 1
        except UnicodeEncodeError:
            pass
    return ok >= 0.9 * len(wide)


def _cjk_text(sample: bytes, encoding: str, complete: bool) -> bool:
    """`sample` decodes in `encoding` without an error, to enough characters that are nearly all CJK."""
    text = _strict(sample, encoding, complete)
    if text is None:
        return False
    wide = _wide(text)
    return len(wide) >= LEGACY_MIN_CHARS and sum(map(_is_cjk, wide)) >= 0.9 * len(wide)


def _gb_name(sample: bytes, complete: bool) -> str:
    return "gbk" if _strict(sample, "gbk", complete) is not None else "gb18030"


def legacy_encoding(sample: bytes, complete: bool) -> str | None:
    """The legacy encoding `sample` is confidently written in (rule 4), or None."""
    from charset_normalizer import from_bytes

    best = from_bytes(sample[:SAMPLE_BYTES]).best()
    name = codecs.lookup(best.encoding).name if best is not None else ""
    if name in GB_ENCODINGS and best.chaos <= 0.2:
        name = _gb_name(sample, complete)
        return name if _cjk_text(sample, name, complete) else None
    if name in CJK_ENCODINGS and best.chaos <= 0.2:
        return name if _cjk_text(sample, name, complete) else None
    if name and not name.startswith("utf") and best.chaos <= 0.2 and _alphabet_text(sample, name, complete):
        return name
    gb = _strict(sample, "gb18030", complete)
    if gb is not None:
        wide = _wide(gb)
        if len(wide) >= LEGACY_MIN_CHARS and _looks_gb(wide):
            return _gb_name(sample, complete)
    return None


def choose_encoding(path: Path, sample: bytes, complete: bool) -> Decoding:
    """Apply the module's rule to a file's first bytes; `complete` says whether they are all of it."""
    dec = Decoding(str(path))
    for bom, enc in ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF32_LE, "utf-32"),  # before UTF-16's:
                     (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF16_LE, "utf-16"),  # FF FE starts both
                     (codecs.BOM_UTF16_BE, "utf-16")):
        if sample.startswith(bom):
            dec.encoding = enc
            return dec
    if b"\x00" in sample:
        raise BinaryFileError(f"{path}: binary file (contains NUL bytes), not text")
    if _strict(sample, "utf-8", complete) is not None:
        return dec
    legacy = legacy_encoding(sample, complete)
    if legacy:
        dec.encoding = legacy
        return dec
    probe = Decoding(str(path))
    probe.decode(sample, 0, final=complete)
    if probe.replaced_bytes > max(STRAY_MIN_BYTES, STRAY_LIMIT * len(sample)):
        from charset_normalizer import from_bytes

        best = from_bytes(sample).best()
        guess = f"`iconv -f {best.encoding} -t utf-8`, {best.encoding} being a guess" if best else "`iconv`"
        raise LmforgeError(
            f"{path}: not UTF-8 ({probe.replaced_bytes:,} of the first {len(sample):,} bytes are invalid, "
            f"the first at byte {probe.first_bad_byte:,}) and no legacy encoding fits "
            f"confidently; convert it to UTF-8 (e.g. with {guess})")
    return dec


def warning(dec: Decoding) -> str:
    """The warning for a file whose bad bytes were replaced (plain text, not markup)."""
    return (f"{dec.file}: {dec.replaced_bytes:,} byte(s) are not valid {dec.encoding}, the first at byte "
            f"offset {dec.first_bad_byte:,}; replaced with U+FFFD. Convert the file to UTF-8 if they are "
            "more than a few stray bytes")
