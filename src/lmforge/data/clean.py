"""Heuristic quality filters and PII masking, applied to each document before dedup and tokenizing.

Each filter is a switch under `data.filters` with its thresholds; all are off by default. The rules
follow Gopher (Rae et al. 2021, appendix A) and C4 (Raffel et al. 2020):

- `lines` (C4): drop lines without terminal punctuation, lines with fewer than `min_line_words`
  words, lines that mention javascript or cookies; drop documents holding "lorem ipsum". The line
  rules change the text; a document left with nothing is removed.
- `repetition` (Gopher): duplicate-line and duplicate-paragraph fractions (of lines and of
  characters), and the share of characters in the most frequent word 2-, 3- and 4-gram.
- `words` (Gopher): word count, mean word length, symbol-to-word ratio (# and ellipses), the share of
  lines that start with a bullet or end with an ellipsis.
- `min_chars`: documents shorter than this many characters go.
- `language=[en, zh]` with `language_model=PATH`: a local fastText language-ID model (fastText's
  lid.176, or GlotLID, whose labels are eng_Latn-style: the part before "_" is matched too) names each
  document's language; documents in other languages, or below `min_language_score`, go (datatrove's
  LanguageFilter rule). Nothing is downloaded: the model file is the user's.

Words: runs of letters/digits, and every CJK character on its own, so Chinese (no spaces) has as many
words as characters; the mean word length is taken over the non-CJK words only, so a Chinese page is
not "too short-worded". Code is not prose: documents from code files (by extension: .py, .c, .js, ...)
skip the prose filters (`lines`, `repetition`, `words`) unless `data.filters.code=true`; `min_chars`
and PII masking apply to every document. Records of a JSONL/Parquet file are prose.

`data.pii=true` replaces e-mail addresses with `<EMAIL>` and IPv4/IPv6 addresses with `<IP>`.

The report (`filters.json` beside the split folders) gives, per filter, the documents and bytes it
removed (lines and their bytes for `lines`) and a few samples of what it dropped.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from lmforge.config import ConfigError, FilterConfig
from lmforge.errors import LmforgeError

PROSE_EXTS = {".txt", ".text", ".md", ".markdown", ".rst", ".org", ".adoc", ".tex", ".html", ".htm", ".xml",
              ".jsonl", ".ndjson", ".json", ".csv", ".parquet", ""}
SAMPLES = 5  # samples kept per filter
SAMPLE_CHARS = 300

_CJK = "\u2e80-\u2fff\u3040-\u30ff\u3100-\u312f\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
WORD = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+")
_CJK_CHAR = re.compile(rf"[{_CJK}]")
TERMINAL = tuple(".!?\"'”’)」』。！？…")
BULLETS = ("•", "●", "○", "▪", "◦", "‣", "⁃", "*", "-", "–", "—", "·")
ELLIPSES = ("...", "…")
_PARA = re.compile(r"\n\s*\n")
# Each pattern starts only where a run begins (the lookbehinds), so a scan is linear in the text.
EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[\w-]+(?:\.[\w-]+)*\.[A-Za-z]{2,}")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
IPV4 = re.compile(rf"(?<![\d.])(?=\d{{1,3}}\.\d)(?:{_OCTET}\.){{3}}{_OCTET}(?![\d.])")
IPV6 = re.compile(r"(?<![\w:])(?=[0-9A-Fa-f]{1,4}:[0-9A-Fa-f:])(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}(?![\w:])"
                  r"|(?<![\w:])(?=[0-9A-Fa-f]{1,4}:[0-9A-Fa-f:])(?:[0-9A-Fa-f]{1,4}:){1,6}(?::[0-9A-Fa-f]{1,4}){1,6}(?![\w:])")


def words(text: str) -> list[str]:
    """The words of `text` as the filters count them (a CJK character is a word)."""
    return WORD.findall(text)


def _is_code(source: str) -> bool:
    """A document from a file whose extension (under .gz/.zst) is not prose or records: code."""
    p = Path(source)
    if p.suffix.lower() in (".gz", ".zst", ".zstd"):
        p = p.with_suffix("")
    return p.suffix.lower() not in PROSE_EXTS


class _Tally:
    """Documents, bytes (and lines) one filter removed, with the first few samples."""

    def __init__(self) -> None:
        self.documents = self.bytes = self.lines = 0
        self.samples: list[str] = []

    def add(self, text: str, docs: int = 1, lines: int = 0) -> None:
        self.documents += docs
        self.lines += lines
        self.bytes += len(text.encode("utf-8"))
        if len(self.samples) < SAMPLES:
            self.samples.append(text[:SAMPLE_CHARS])

    def as_dict(self) -> dict:
        return {"documents": self.documents, "bytes": self.bytes, "lines": self.lines, "samples": self.samples}


def _dup_fractions(items: list[str]) -> tuple[float, float]:
    """(share of items that repeat an earlier one, share of characters in those repeats)."""
    if not items:
        return 0.0, 0.0
    seen: set[str] = set()
    dup = dup_chars = 0
    for it in items:
        if it in seen:
            dup += 1
            dup_chars += len(it)
        seen.add(it)
    return dup / len(items), dup_chars / max(sum(map(len, items)), 1)


def top_ngram_fraction(ws: list[str], n: int) -> float:
    """Share of word characters covered by the occurrences of the most frequent word n-gram (Gopher)."""
    if len(ws) < n:
        return 0.0
    grams = Counter(tuple(ws[i:i + n]) for i in range(len(ws) - n + 1))
    gram, count = max(grams.items(), key=lambda kv: (kv[1], kv[0]))
    if count < 2:
        return 0.0
    return count * sum(map(len, gram)) / max(sum(map(len, ws)), 1)


class Cleaner:
    """Applies `data.filters` and `data.pii` to documents, counting what each rule removed."""

    def __init__(self, f: FilterConfig, pii: bool):
        self.f, self.pii = f, pii
        self.tallies = {k: _Tally() for k in ("lines", "lorem_ipsum", "repetition", "words", "min_chars",
                                               "language")}
        self.pii_counts = Counter()
        self.languages: Counter = Counter()  # the language named for each document the language filter saw
        self.documents_in = 0
        self._langid = _language_model(f) if f.language else None

    @property
    def active(self) -> bool:
        f = self.f
        return self.pii or f.lines or f.repetition or f.words or f.min_chars > 0 or bool(f.language)

    def __call__(self, text: str, source: str) -> str | None:
        """The cleaned text of one document, or None when a filter removes it."""
        self.documents_in += 1
        f = self.f
        if f.code or not _is_code(source):
            if f.lines:
                text = self._lines(text)
                if text is None:
                    return None
            if f.repetition and self._repetitive(text):
                self.tallies["repetition"].add(text)
                return None
            if f.words and self._bad_words(text):
                self.tallies["words"].add(text)
                return None
            if self._langid is not None and not self._language_ok(text):
                self.tallies["language"].add(text)
                return None
        if len(text) < f.min_chars:
            self.tallies["min_chars"].add(text)
            return None
        return self._mask(text) if self.pii else text

    def _lines(self, text: str) -> str | None:
        f = self.f
        if "lorem ipsum" in text.lower():
            self.tallies["lorem_ipsum"].add(text)
            return None
        kept, dropped = [], []
        for line in text.splitlines(keepends=True):
            s = line.strip()
            low = s.lower()
            if not s:
                kept.append(line)  # blank lines keep the paragraph structure
            elif (not s.endswith(TERMINAL) or len(words(s)) < f.min_line_words
                  or "javascript" in low or "cookie" in low):
                dropped.append(line)
            else:
                kept.append(line)
        out = "".join(kept)
        if not out.strip():
            self.tallies["lines"].add(text, docs=1, lines=len(dropped))
            return None
        if dropped:
            self.tallies["lines"].add("".join(dropped), docs=0, lines=len(dropped))
        return out

    def _repetitive(self, text: str) -> bool:
        f = self.f
        lines = [s for s in (x.strip() for x in text.splitlines()) if s]
        paras = [s for s in (x.strip() for x in _PARA.split(text)) if s]
        line_frac, line_chars = _dup_fractions(lines)
        para_frac, para_chars = _dup_fractions(paras)
        if (line_frac > f.max_dup_line_frac or line_chars > f.max_dup_line_char_frac
                or para_frac > f.max_dup_para_frac or para_chars > f.max_dup_para_char_frac):
            return True
        ws = [w.lower() for w in words(text)]
        return any(top_ngram_fraction(ws, n) > limit for n, limit in zip((2, 3, 4), f.max_top_ngram_frac))

    def _bad_words(self, text: str) -> bool:
        f = self.f
        ws = words(text)
        if not f.min_words <= len(ws) <= f.max_words:
            return True
        latin = [w for w in ws if not _CJK_CHAR.match(w)]
        if latin:
            mean = sum(map(len, latin)) / len(latin)
            if not f.min_mean_word_len <= mean <= f.max_mean_word_len:
                return True
        symbols = text.count("#") + text.count("...") + text.count("…")
        if symbols / max(len(ws), 1) > f.max_symbol_ratio:
            return True
        lines = [s.strip() for s in text.splitlines() if s.strip()]
        if lines:
            if sum(s.startswith(BULLETS) for s in lines) / len(lines) > f.max_bullet_lines:
                return True
            if sum(s.endswith(ELLIPSES) for s in lines) / len(lines) > f.max_ellipsis_lines:
                return True
        return False

    def _language_ok(self, text: str) -> bool:
        labels, probs = self._langid.predict(" ".join(text.split()))  # fastText reads one line
        lang = labels[0].removeprefix("__label__") if labels else "unknown"
        self.languages[lang] += 1
        wanted = lang in self.f.language or lang.split("_")[0] in self.f.language
        return wanted and float(probs[0]) >= self.f.min_language_score

    def _mask(self, text: str) -> str:
        for name, rx, repl, mark in (("email", EMAIL, "<EMAIL>", "@"), ("ipv4", IPV4, "<IP>", "."),
                                     ("ipv6", IPV6, "<IP>", ":")):
            if mark not in text:
                continue
            text, n = rx.subn(repl, text)
            self.pii_counts[name] += n
        return text

    def report(self) -> dict:
        out = {"documents_in": self.documents_in, "filters": {k: t.as_dict() for k, t in self.tallies.items()},
               "pii": dict(self.pii_counts) if self.pii else None, "settings": vars(self.f)}
        if self.f.language:
            out["languages"] = dict(sorted(self.languages.items()))
        return out


def merge_reports(reports: list[dict]) -> dict:
    """One report from the reports of consecutive slices of a corpus, as one Cleaner over all of it gives.

    Counts add up; the samples are the first ones in corpus order, as one pass would keep them.
    """
    out = json.loads(json.dumps(reports[0]))
    for rep in reports[1:]:
        out["documents_in"] += rep["documents_in"]
        for name, t in rep["filters"].items():
            mine = out["filters"][name]
            for k in ("documents", "bytes", "lines"):
                mine[k] += t[k]
            mine["samples"] = (mine["samples"] + t["samples"])[:SAMPLES]
        if rep["pii"] is not None:
            out["pii"] = _add(out["pii"], rep["pii"])
        if "languages" in rep:
            out["languages"] = dict(sorted(_add(out["languages"], rep["languages"]).items()))
    return out


def _add(a: dict, b: dict) -> dict:
    """Counts summed key by key, zeros kept (Counter's + drops them), in first-seen order."""
    return {k: a.get(k, 0) + b.get(k, 0) for k in {**a, **b}}


def _language_model(f: FilterConfig):
    """The fastText model data.filters.language_model names, loaded once per process."""
    if not f.language_model:
        raise ConfigError("data.filters.language needs a local fastText language-ID model: set "
                          "data.filters.language_model=PATH (fastText's lid.176.ftz or lid.176.bin from "
                          "fasttext.cc/docs/en/language-identification.html, or GlotLID's model.bin)",
                          "data.filters.language_model")
    path = Path(f.language_model).expanduser()
    if not path.is_file():
        raise LmforgeError(f"data.filters.language_model={f.language_model}: no such file")
    if not 0 <= f.min_language_score <= 1:
        raise ConfigError(f"data.filters.min_language_score must be in [0, 1], got {f.min_language_score}",
                          "data.filters.min_language_score")
    key = str(path.resolve())
    if key not in _MODELS:
        try:
            import fasttext
        except ImportError:
            raise LmforgeError('data.filters.language needs fastText: pip install "lmforge[langid]" '
                               "(the fasttext-numpy2-wheel package)") from None
        fasttext.FastText.eprint = lambda *a, **k: None  # its load_model prints a warning per call
        try:
            _MODELS[key] = fasttext.load_model(key)
        except ValueError as e:
            raise LmforgeError(f"data.filters.language_model={f.language_model}: not a fastText model ({e})") from None
    return _MODELS[key]


_MODELS: dict[str, object] = {}
