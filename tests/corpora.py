"""Seeded corpora the own-data tests make for themselves, and helpers to read a run's splits back.

Sentences from a word list one per line (no blank lines), lines of Chinese verse built from CJK
characters, Python files from the standard library.
"""

from __future__ import annotations

import random
import shutil
import sysconfig
from pathlib import Path

import numpy as np

from lmforge.config import Config, load_config
from lmforge.data.shards import open_shards
from lmforge.tokenizer import Tokenizer

WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but "
         "have an they you were her all she there would their we him been has when who will more no if out so "
         "said what up its about into than them can only other new some could time these two may then do first "
         "any my now such like our over man me even most made after also did many before must through back "
         "years where much your way well down should because each just those people how too little state good "
         "very make world still own see men work long get here between both life being under never day same "
         "another know while last might us great old year off come since against go came right used take three "
         "king lord house city land river night water light word heart hand voice").split()
HANZI = ("天地玄黄宇宙洪荒日月盈昃辰宿列张寒来暑往秋收冬藏闰余成岁律吕调阳云腾致雨露结为霜金生丽水玉出昆冈"
         "剑号巨阙珠称夜光果珍李柰菜重芥姜海咸河淡鳞潜羽翔山川草木春花秋月风雪江湖人心明白")
STDLIB = Path(sysconfig.get_paths()["stdlib"])
CODE = ["textwrap.py", "string.py", "bisect.py", "heapq.py", "colorsys.py", "fnmatch.py", "shlex.py", "glob.py",
        "keyword.py", "abc.py", "numbers.py", "queue.py", "sched.py", "copy.py", "json/decoder.py"]
LIMIT = 32768  # data.max_doc_bytes' default


def english(n_bytes: int, seed: int = 0) -> str:
    """A 'book': one sentence per line, no blank lines."""
    rng = random.Random(seed)
    lines, size = [], 0
    while size < n_bytes:
        s = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 18)))
        s = s[0].upper() + s[1:] + rng.choice(".?!.") + "\n"
        lines.append(s)
        size += len(s)
    return "".join(lines)


def chinese(n_bytes: int, seed: int = 0, newline: str = "\n") -> str:
    """Two-part lines of five- or seven-character verse, one per line."""
    rng = random.Random(seed)
    lines, size = [], 0
    while size < n_bytes:
        n = rng.choice((5, 7))
        s = "，".join("".join(rng.choice(HANZI) for _ in range(n)) for _ in range(2)) + "。" + newline
        lines.append(s)
        size += len(s.encode())
    return "".join(lines)


def code_folder(dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for rel in CODE:
        shutil.copy(STDLIB / rel, dst / rel.replace("/", "_"))
    return dst


def cfg_for(run: Path, sources: list[Path], **data) -> Config:
    cfg = load_config(overrides=[f"run_dir={run}", "tokenizer.vocab_size=384", "data.workers=1",
                                 "data.val_fraction=0.05", "tokenizer.held_out_fraction=0.05"])
    cfg.data.sources = [str(s) for s in sources]
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


def split_texts(run: Path, split: str) -> list[str]:
    tok = Tokenizer.load(run / "tokenizer")
    arrays, m = open_shards(run / "data" / split)
    ids = np.concatenate([np.asarray(a) for a in arrays]).astype(np.int64)
    ends = np.flatnonzero(ids == m["eot_id"])
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tok.decode(ids[s:e]) for s, e in zip(starts, ends)]
