"""What a document is: text cut into pieces of at most `data.max_doc_bytes` UTF-8 bytes.

A piece ends, in this order of preference:

1. at the last paragraph break (the start of a line of text after one or more blank lines) that
   leaves the piece at least half full;
2. else after the last line that fits;
3. else (one line longer than the limit: minified code, Chinese prose without line breaks) after
   the last space or punctuation mark in the second half of the window, else at the character
   boundary nearest the limit.

Nothing is dropped or added: the pieces joined are the text. Cuts depend only on the text, not on
how it arrives: a file streamed in chunks that end at line ends is cut exactly as the whole text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

_BLANK_RUN = re.compile(r"\n(?:[^\S\n]*\n)+")  # a line end, then blank lines; a paragraph may start after
_TEXT_AHEAD = re.compile(r"[^\S\n]*\S")  # the line starting here holds text
_BREAK = re.compile(r"[\s。！？；，、.!?;,]")  # where a line longer than a document may be cut


def utf8_size(text: str) -> int:
    """UTF-8 bytes of `text` (without encoding it when it is ASCII)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _fits(text: str, start: int, nbytes: int) -> int:
    """The largest i such that text[start:i] is at most `nbytes` UTF-8 bytes."""
    window = text[start:start + nbytes]  # a character is at least one byte
    if window.isascii():
        return start + len(window)
    return start + len(window.encode("utf-8", "surrogatepass")[:nbytes].decode("utf-8", "ignore"))


def _longer(text: str, start: int, limit: int) -> bool:
    n = len(text) - start
    return n > limit or (4 * n > limit and utf8_size(text[start:]) > limit)


def _cut(text: str, start: int, limit: int) -> int:
    """Where the piece starting at `start` ends; the text after `start` is longer than `limit` bytes."""
    hi = _fits(text, start, limit)
    half = _fits(text, start, limit // 2)
    para = 0
    for m in _BLANK_RUN.finditer(text, start, hi):
        if m.end() >= half and _TEXT_AHEAD.match(text, m.end()):
            para = m.end()
    if para:
        return para
    line_end = text.rfind("\n", start, hi)
    if line_end >= 0:
        return line_end + 1
    cut = hi
    for m in _BREAK.finditer(text, half, hi):
        cut = m.end()
    return cut


def split_text(chunks: Iterable[str], limit: int) -> Iterator[tuple[int, str]]:
    """(first line number, text) of the pieces of the text that `chunks` make up, by the module's rule.

    Every chunk but the last must end with a line end, so that the text around a cut has arrived
    whole. `limit` 0 gives one piece of everything.
    """
    if not limit:
        text = "".join(chunks)
        if text:
            yield 1, text
        return
    buf, line = "", 1
    for chunk in chunks:
        buf = buf + chunk if buf else chunk
        start = 0
        while _longer(buf, start, limit):
            end = _cut(buf, start, limit)
            yield line, buf[start:end]
            line += buf.count("\n", start, end)
            start = end
        buf = buf[start:]
    if buf:
        yield line, buf
