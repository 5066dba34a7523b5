"""Columnar sources: Parquet, Arrow files and Hugging Face `datasets` folders, with a row filter.

A folder written by `datasets`' `save_to_disk` (state.json + dataset_info.json beside data-*.arrow)
is read as its Arrow files in the order state.json lists them; a DatasetDict folder (dataset_dict.json)
is an error that names its splits, since which split is the corpus is the user's choice. Arrow files
are the IPC stream format `datasets` writes, or the IPC file format. Everything is read a record batch
at a time, memory-mapped where the file is not compressed, so a file larger than memory streams.

A dataset on the Hugging Face Hub is read only when a source names one, `hf:<name>[:<config>][@<split>]`
(`hf:HuggingFaceFW/fineweb-edu:sample-10BT@train`), in `datasets`' streaming mode: rows arrive as they
download, nothing is cached whole, and nothing else in lmforge touches the network.

`data.filter` keeps the rows whose column compares true: `lang=en`, `lang!=en`, `score>=0.5`
(`=`/`!=` compare text, `<`, `<=`, `>`, `>=` numbers). Only columnar sources have columns to filter
on; other files with a filter set are an error that names the key.
"""

from __future__ import annotations

import json
import operator
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from lmforge.errors import LmforgeError

_FILTER = re.compile(r"^\s*([A-Za-z_][\w.-]*)\s*(!=|>=|<=|=|>|<)\s*(.*?)\s*$")
_OPS: dict[str, Callable] = {"=": operator.eq, "!=": operator.ne, ">=": operator.ge, "<=": operator.le,
                             ">": operator.gt, "<": operator.lt}


class RowFilter:
    """`data.filter` parsed: column, comparison, value."""

    def __init__(self, spec: str):
        m = _FILTER.match(spec)
        if not m:
            raise LmforgeError(f"data.filter: {spec!r} is not COLUMN=VALUE, COLUMN!=VALUE or COLUMN>=NUMBER "
                               "(also <, <=, >)")
        self.column, self.op, value = m.groups()
        self.spec = spec
        if self.op in ("=", "!="):
            self.value: object = value
        else:
            try:
                self.value = float(value)
            except ValueError:
                raise LmforgeError(f"data.filter: {spec!r} compares with {self.op}, which needs a number, "
                                   f"not {value!r}") from None

    def keep(self, cell: object) -> bool:
        if cell is None:
            return False
        if self.op in ("=", "!="):
            return _OPS[self.op](str(cell), self.value)
        if not isinstance(cell, int | float) or isinstance(cell, bool):
            return False
        return _OPS[self.op](float(cell), self.value)


def hf_folder_files(folder: Path) -> list[Path] | None:
    """The Arrow files of a `save_to_disk` folder in their order, or None if `folder` is not one."""
    if (folder / "dataset_dict.json").is_file():
        try:
            splits = json.loads((folder / "dataset_dict.json").read_text(encoding="utf-8")).get("splits", [])
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            splits = []
        raise LmforgeError(f"{folder}: a datasets DatasetDict folder; name one split's folder as the source "
                           f"({', '.join(str(folder / s) for s in splits) or 'its split subfolders'})")
    state = folder / "state.json"
    if not (state.is_file() and (folder / "dataset_info.json").is_file()):
        return None
    try:
        files = [folder / f["filename"] for f in json.loads(state.read_text(encoding="utf-8"))["_data_files"]]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise LmforgeError(f"{state}: not a datasets state.json ({e}); is the folder a save_to_disk output?") from None
    for f in files:
        if not f.is_file():
            raise LmforgeError(f"{f}: listed in {state} but missing; the datasets folder is incomplete")
    return files


def _arrow_batches(path: Path, source, reopen: Callable[[], object] | None = None) -> tuple[list[str], Iterator]:
    """Schema names and record batches of an Arrow IPC stream, or of an IPC file (which needs random
    access: a compressed one is read whole through `reopen`)."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    try:
        reader = ipc.open_stream(source)
        return reader.schema.names, iter(reader)
    except pa.ArrowInvalid:
        pass
    try:
        f = ipc.open_file(pa.BufferReader(reopen().read()) if reopen else source)
    except (pa.ArrowException, OSError) as e:
        raise LmforgeError(f"{path}: not a valid Arrow file ({e})") from None
    return f.schema.names, (f.get_batch(i) for i in range(f.num_record_batches))


def read_columnar(path: Path, kind: str, field: str, row_filter: RowFilter | None,
                  opener: Callable[[], object] | None) -> Iterator[tuple[int, str]]:
    """(row, text) of a Parquet or Arrow file's `field`, rows failing `row_filter` left out.

    `opener` opens a .gz/.zst file decompressing: an Arrow stream is then read through it as it
    decompresses; Parquet (whose footer comes last) and the Arrow file format need it whole."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if kind == ".parquet":
            pf = pq.ParquetFile(pa.BufferReader(opener().read()) if opener else str(path))
            names = pf.schema_arrow.names
            cols = [field] + ([row_filter.column] if row_filter and row_filter.column != field else [])
            batches: Iterator = (pf.iter_batches(columns=[c for c in cols if c in names], batch_size=4096)
                                 if field in names else iter(()))
        elif opener:
            names, batches = _arrow_batches(path, pa.PythonFile(opener(), mode="r"), opener)
        else:
            names, batches = _arrow_batches(path, pa.memory_map(str(path)))
    except (pa.ArrowException, OSError, EOFError) as e:
        raise LmforgeError(f"{path}: not a valid {'Parquet' if kind == '.parquet' else 'Arrow'} file ({e})") from None
    if field not in names:
        raise LmforgeError(f"{path}: no column '{field}' (columns: {', '.join(names)}); "
                           "set data.text_field to the column that holds the text")
    if row_filter and row_filter.column not in names:
        raise LmforgeError(f"{path}: data.filter names column '{row_filter.column}', which this file does not "
                           f"have (columns: {', '.join(names)})")
    row = 0
    try:
        for batch in batches:
            texts = batch.column(batch.schema.get_field_index(field)).to_pylist()
            keep = (batch.column(batch.schema.get_field_index(row_filter.column)).to_pylist()
                    if row_filter else None)
            for i, value in enumerate(texts):
                row += 1
                if value is None or (keep is not None and not row_filter.keep(keep[i])):
                    continue
                if not isinstance(value, str):
                    raise LmforgeError(f"{path}: row {row}: column '{field}' is {type(value).__name__}, not text")
                yield row, value
    except (pa.ArrowException, OSError, EOFError) as e:
        raise LmforgeError(f"{path}: corrupt after row {row} ({e})") from None


HUB_PREFIX = "hf:"


def read_hub(source: str, field: str, row_filter: RowFilter | None) -> Iterator[tuple[int, str]]:
    """(row, text) of a Hub dataset named `hf:<name>[:<config>][@<split>]`, streamed (see the module docstring)."""
    spec = source[len(HUB_PREFIX):]
    spec, _, split = spec.partition("@")
    name, _, config = spec.partition(":")
    if not name:
        raise LmforgeError(f"source '{source}': name a dataset, hf:<name>[:<config>][@<split>]")
    try:
        import datasets
    except ImportError:
        raise LmforgeError(f"source '{source}' needs the datasets package: pip install datasets") from None
    try:
        rows = datasets.load_dataset(name, config or None, split=split or "train", streaming=True)
    except Exception as e:  # the hub client raises many types: name the source whatever it is
        raise LmforgeError(f"source '{source}': cannot open the dataset ({type(e).__name__}: {e})") from None
    for i, row in enumerate(rows, 1):
        if field not in row:
            raise LmforgeError(f"source '{source}': row {i} has no field '{field}' (fields: "
                               f"{', '.join(map(str, row))}); set data.text_field")
        if row_filter is not None:
            if row_filter.column not in row:
                raise LmforgeError(f"source '{source}': data.filter names field '{row_filter.column}', which "
                                   f"its rows do not have (fields: {', '.join(map(str, row))})")
            if not row_filter.keep(row[row_filter.column]):
                continue
        value = row[field]
        if value is None:
            continue
        if not isinstance(value, str):
            raise LmforgeError(f"source '{source}': row {i}: field '{field}' is {type(value).__name__}, not text")
        yield i, value
