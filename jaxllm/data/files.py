"""Files → records: globs, format detection, and resumable readers for text, jsonl(.gz) and parquet.

A reader yields `Record`s from a `Cursor` (record number, byte offset, line) and can restart at any cursor
it produced, so a data pipeline resumes exactly where its checkpoint says.
"""
from __future__ import annotations

import dataclasses
import glob
import gzip
import os
from pathlib import Path
from typing import Iterator

FORMATS = ("auto", "text", "jsonl", "parquet")
TEXT_SPLITS = ("blank_line", "line", "file")
ASSETS_PREFIX = "assets:"
ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"


class DataError(ValueError):
    """A data file or record cannot be used; the message names file:line."""


def resolve_path(path: str) -> str:
    """`assets:NAME` → the file shipped in `jaxllm/assets/`; anything else unchanged (env vars and ~ expanded)."""
    if path.startswith(ASSETS_PREFIX):
        return str(ASSETS_DIR / path[len(ASSETS_PREFIX):])
    return os.path.expanduser(os.path.expandvars(path))


def expand_paths(patterns: str | list[str], what: str = "data") -> list[Path]:
    """Sorted files matching one or more paths/globs; an error names the pattern that matched nothing."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    files: list[Path] = []
    for pattern in patterns:
        resolved = resolve_path(pattern)
        matches = sorted(glob.glob(resolved, recursive=True)) if glob.has_magic(resolved) else [resolved]
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise DataError(f"{what}: '{pattern}' matches no file")
        files.extend(Path(m) for m in matches)
    return files


def detect_format(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".txt", ".text", ".md")):
        return "text"
    raise DataError(f"{path}: cannot tell the format from the name; set the source's `format` to one of "
                    f"{FORMATS[1:]}")


@dataclasses.dataclass
class Cursor:
    """Where the next record starts: its number in the file, byte offset (uncompressed) and 1-based line."""
    record: int = 0
    offset: int = 0
    line: int = 1


@dataclasses.dataclass
class Record:
    where: str          # "file:line" (or "file:row N" for parquet) for messages
    value: object       # bytes for text/jsonl lines, the column value for parquet
    next: Cursor        # cursor just after this record


def _open(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _lines(path: Path, start: Cursor) -> Iterator[tuple[int, int, bytes]]:
    """(line number, offset after the line, raw line without newline) from `start`."""
    with _open(path) as f:
        if start.offset:
            f.seek(start.offset)  # gzip seeks by re-reading: O(offset), paid once on resume
        offset, line = start.offset, start.line
        for raw in iter(f.readline, b""):
            offset += len(raw)
            yield line, offset, raw.rstrip(b"\r\n")
            line += 1


def read_records(path: Path, fmt: str, start: Cursor, *, text_split: str = "blank_line",
                 text_field: str = "text") -> Iterator[Record]:
    """Records of one file from `start`. Text: a document per line, per blank-line-separated paragraph, or
    per file; jsonl: a non-blank line (parsed later, so a bad line is skipped by the caller); parquet: the
    `text_field` column's value of each row."""
    if fmt == "parquet":
        yield from _parquet_records(path, start, text_field)
        return
    record = start.record
    if fmt == "jsonl" or text_split == "line":
        for line, offset, raw in _lines(path, start):
            if raw.strip():
                record += 1
                yield Record(f"{path}:{line}", raw, Cursor(record, offset, line + 1))
        return
    if text_split == "file":
        if start.record == 0:
            with _open(path) as f:
                data = f.read()
            yield Record(f"{path}:1", data, Cursor(1, len(data), data.count(b"\n") + 2))
        return
    paragraph: list[bytes] = []
    first_line, end = start.line, Cursor(record, start.offset, start.line)
    for line, offset, raw in _lines(path, start):
        end = Cursor(record, offset, line + 1)
        if raw.strip():
            if not paragraph:
                first_line = line
            paragraph.append(raw)
            continue
        if paragraph:
            record += 1
            yield Record(f"{path}:{first_line}", b"\n".join(paragraph), Cursor(record, offset, line + 1))
            paragraph = []
    if paragraph:
        record += 1
        yield Record(f"{path}:{first_line}", b"\n".join(paragraph), Cursor(record, end.offset, end.line))


def _parquet_records(path: Path, start: Cursor, text_field: str) -> Iterator[Record]:
    import pyarrow.parquet as pq

    handle = pq.ParquetFile(path)
    names = handle.schema_arrow.names
    if text_field not in names:
        from jaxllm.config import closest
        raise DataError(f"{path}: no column '{text_field}'{closest(text_field, names)}; columns: {names}")
    first = 0
    for group in range(handle.num_row_groups):
        rows = handle.metadata.row_group(group).num_rows
        if first + rows <= start.record:
            first += rows
            continue
        values = handle.read_row_group(group, columns=[text_field]).column(0).to_pylist()
        for i in range(max(0, start.record - first), rows):
            row = first + i
            yield Record(f"{path}:row {row + 1}", values[i], Cursor(row + 1, 0, row + 2))
        first += rows
