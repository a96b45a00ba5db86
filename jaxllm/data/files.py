"""Files → records: globs, format detection, and resumable readers for text, jsonl(.gz) and parquet.

A reader yields `Record`s from a `Cursor` (record number, byte offset, line) and can restart at any cursor
it produced, so a data pipeline resumes exactly where its checkpoint says. A file that ends early or cannot
be decoded (a truncated `.gz`, a damaged parquet footer or row group) raises `DamagedFile` naming the file
and the last good line; `read_json_lines` is the one jsonl reader of every stage (pretraining, SFT, DPO, RM).
"""
from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import os
import zlib
from pathlib import Path
from typing import Callable, Iterator

from jaxllm import storage

FORMATS = ("auto", "text", "jsonl", "parquet")
TEXT_SPLITS = ("blank_line", "line", "file")
ASSETS_PREFIX = "assets:"
ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"


class DataError(ValueError):
    """A data file or record cannot be used; the message names file:line."""


class DamagedFile(DataError):
    """A file ends early or cannot be decoded. `resume` is where reading can go on (the next parquet row
    group), or None when the rest of the file is lost."""

    def __init__(self, message: str, resume: "Cursor | None" = None):
        super().__init__(message)
        self.resume = resume


class Malformed(Exception):
    """A record is unusable; `reason` is the short counter name."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason + (f": {detail}" if detail else ""))
        self.reason = reason


# What a damaged file raises while it is read: gzip's truncation (EOFError), corrupt deflate data,
# a bad header or CRC, and I/O errors of the device.
_READ_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile, OSError)
_BOM = b"\xef\xbb\xbf"


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
        storage.check_bucket(resolved)  # a missing bucket or no credentials: that line, not "no file"
        if glob.has_magic(resolved):
            matches = storage.glob(resolved, must_match=False)
        else:
            matches = [resolved]
        matches = [m for m in matches if storage.is_file(m)]
        if not matches:
            raise DataError(f"{what}: '{pattern}' matches no file")
        files.extend(storage.path(m) for m in matches)
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
    gz = path.name.lower().endswith(".gz")
    if not storage.is_remote(path):
        return gzip.open(path, "rb") if gz else open(path, "rb")
    return _GzipOwning(storage.open(path, "rb")) if gz else storage.open(path, "rb")


class _GzipOwning(gzip.GzipFile):
    """gzip over a bucket object streamed in blocks (seek is a ranged read), closing the object with it."""

    def __init__(self, raw):
        super().__init__(fileobj=raw, mode="rb")
        self._raw = raw

    def close(self):
        try:
            super().close()
        finally:
            self._raw.close()


def _cause(err: BaseException) -> str:
    """A library's error text on one line (Arrow's span several)."""
    return " ".join(str(err).split())[:300] or type(err).__name__


def _damage(path: Path, err: BaseException, line: int) -> DamagedFile:
    what = ("ends early (truncated)" if isinstance(err, EOFError) else
            "is not valid gzip data" if isinstance(err, (zlib.error, gzip.BadGzipFile)) else "cannot be read")
    after = f" after line {line - 1}" if line > 1 else ""
    return DamagedFile(f"{path}: file {what}{after}: {_cause(err)}")


def _lines(path: Path, start: Cursor) -> Iterator[tuple[int, int, bytes]]:
    """(line number, offset after the line, raw line without newline) from `start`; a UTF-8 byte-order
    mark at the start of the file is dropped. DamagedFile when the file cannot be read to its end."""
    offset, line = start.offset, start.line
    try:
        with _open(path) as f:
            if start.offset:
                f.seek(start.offset)  # gzip seeks by re-reading: O(offset), paid once on resume
            for raw in iter(f.readline, b""):
                at = offset
                offset += len(raw)
                if at == 0 and raw.startswith(_BOM):
                    raw = raw[len(_BOM):]
                yield line, offset, raw.rstrip(b"\r\n")
                line += 1
    except _READ_ERRORS as err:
        raise _damage(path, err, line) from None


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
            try:
                with _open(path) as f:
                    data = f.read()
            except _READ_ERRORS as err:
                raise _damage(path, err, 1) from None
            text = data[len(_BOM):] if data.startswith(_BOM) else data
            yield Record(f"{path}:1", text, Cursor(1, len(data), data.count(b"\n") + 2))
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
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        handle = pq.ParquetFile(storage.open(path, "rb") if storage.is_remote(path) else path)
    except (pa.ArrowException, OSError) as err:
        raise DamagedFile(f"{path}: not a readable parquet file (truncated or damaged?): {_cause(err)}") from None
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
        try:
            values = handle.read_row_group(group, columns=[text_field]).column(0).to_pylist()
        except (pa.ArrowException, OSError) as err:
            raise DamagedFile(f"{path}: rows {first + 1}-{first + rows} (row group {group}) cannot be read: "
                              f"{_cause(err)}",
                              resume=Cursor(first + rows, 0, first + rows + 1)) from None
        for i in range(max(0, start.record - first), rows):
            row = first + i
            yield Record(f"{path}:row {row + 1}", values[i], Cursor(row + 1, 0, row + 2))
        first += rows


def decode_json_line(raw: bytes):
    """The JSON value of one jsonl line, or `Malformed` ("non-UTF-8", "bad JSON")."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise Malformed("non-UTF-8", f"byte {err.start}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise Malformed("bad JSON", err.msg) from None


def read_json_lines(path: str | os.PathLike, *, on_error: str = "skip",
                    skip: Callable[[str], None] = lambda reason: None) -> Iterator[tuple[str, object]]:
    """("file:line", value) for each non-blank line of a .jsonl or .jsonl.gz file (a UTF-8 byte-order mark
    is accepted). A line that is not UTF-8 or not JSON, and a file that ends early or is not valid gzip,
    raise DataError naming file:line when `on_error` is "raise"; with "skip" they are passed to
    `skip(reason)` ("non-UTF-8", "bad JSON", "damaged file"; the rest of a damaged file is lost)."""
    path = storage.path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    try:
        for line, _, raw in _lines(path, Cursor()):
            if not raw.strip():
                continue
            try:
                yield f"{path}:{line}", decode_json_line(raw)
            except Malformed as err:
                if on_error == "raise":
                    raise DataError(f"{path}:{line}: {err} (data.on_error=raise)") from None
                skip(err.reason)
    except DamagedFile as err:
        if on_error == "raise":
            raise DataError(f"{err} (data.on_error=raise)") from None
        warn_damaged(str(err))
        skip("damaged file")


_warned: set[str] = set()


def warn_damaged(message: str) -> None:
    """One stderr line per damaged file and process (its records are also counted as skipped)."""
    if message not in _warned:
        _warned.add(message)
        import sys
        print(f"warning: {message} (skipped: data.on_error=skip)", file=sys.stderr)
