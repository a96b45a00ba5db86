"""A grain source of documents (strings) from files, with host sharding, seeded block shuffling, epochs,
malformed-record accounting, and an exact, small, JSON iterator state.

Order: each epoch visits the files in a seeded order. With at least as many files as hosts, host h reads
files h, h + hosts, ... of that order and nothing else (a sharded corpus is not read by every host); with
fewer files, records are dealt round-robin (record k of the epoch goes to host k mod hosts). Each host
reads its documents in blocks of `shuffle_window` and shuffles within a block. The state is the start of
the current block plus how much of it was consumed, so a resumed iterator re-reads one block and
continues with the same documents.

Held out: with `holdout=N`, the source's last N records (the end of its last file(s), in the sorted order
of its paths) are never read for training; `heldout_documents` returns exactly those, for evaluation.
"""
from __future__ import annotations

import dataclasses
import zlib
from pathlib import Path

import grain
import numpy as np

from jaxllm import storage
from jaxllm.data.files import (Cursor, DamagedFile, DataError, Malformed, decode_json_line, detect_format,
                               read_records, warn_damaged)

ERROR_POLICIES = ("skip", "raise")


@dataclasses.dataclass
class SourceStats:
    """Counts for one source on this host (restored with the iterator state)."""
    documents: int = 0
    epochs: int = 0
    skipped: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"documents": self.documents, "epochs": self.epochs, "skipped": dict(self.skipped)}


def parse_document(value, fmt: str, text_field: str) -> str:
    """The document text of one record, or `Malformed` (non-UTF-8, bad JSON, not an object, missing field,
    not a string, empty text)."""
    if isinstance(value, bytes):
        if fmt == "jsonl":
            record = decode_json_line(value)
            if not isinstance(record, dict):
                raise Malformed("not an object", f"got {type(record).__name__}")
            if text_field not in record:
                raise Malformed("missing field", f"no '{text_field}'")
            value = record[text_field]
        else:
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError as err:
                raise Malformed("non-UTF-8", f"byte {err.start}") from None
    if value is None:
        raise Malformed("missing field", f"'{text_field}' is null")
    if not isinstance(value, str):
        raise Malformed("not a string", f"'{text_field}' is {type(value).__name__}")
    if not value.strip():
        raise Malformed("empty text")
    return value


def _count_records(path: Path, fmt: str, text_split: str, text_field: str) -> int:
    return sum(1 for _ in read_records(path, fmt, Cursor(), text_split=text_split, text_field=text_field))


def training_limits(files: list[Path], formats: list[str], holdout: int, *, text_split: str = "blank_line",
                    text_field: str = "text") -> list[int | None]:
    """Per file, how many leading records are training records (None: all) when the last `holdout`
    records of `files` (in that order) are held out."""
    limits: list[int | None] = [None] * len(files)
    left = holdout
    for k in reversed(range(len(files))):
        if left <= 0:
            break
        count = _count_records(files[k], formats[k], text_split, text_field)
        limits[k] = max(count - left, 0)
        left -= count - limits[k]
    return limits


def heldout_documents(files: list[Path], holdout: int, *, fmt: str = "auto", text_field: str = "text",
                      text_split: str = "blank_line") -> list[str]:
    """The documents of the last `holdout` records of `files`: what a `DocumentSource` with the same
    `holdout` never yields (malformed records among them are left out)."""
    files = [Path(f) for f in files]
    formats = [detect_format(f) if fmt == "auto" else fmt for f in files]
    limits = training_limits(files, formats, holdout, text_split=text_split, text_field=text_field)
    docs = []
    for path, form, limit in zip(files, formats, limits):
        if limit is None:
            continue
        for rec in read_records(path, form, Cursor(), text_split=text_split, text_field=text_field):
            if rec.next.record > limit:
                try:
                    docs.append(parse_document(rec.value, form, text_field))
                except Malformed:
                    pass
    return docs


class DocumentSource(grain.IterDataset):
    """Documents (str) from `files`; infinite unless `num_epochs` is set."""

    def __init__(self, files: list[Path], *, name: str = "data", fmt: str = "auto", text_field: str = "text",
                 text_split: str = "blank_line", shuffle: bool = True, shuffle_window: int = 10_000,
                 seed: int = 0, shard_index: int = 0, shard_count: int = 1, on_error: str = "skip",
                 num_epochs: int | None = None, holdout: int = 0):
        super().__init__()
        if on_error not in ERROR_POLICIES:
            raise ValueError(f"on_error must be one of {ERROR_POLICIES}, got {on_error!r}")
        if not 0 <= shard_index < shard_count:
            raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
        if shuffle_window < 1:
            raise ValueError(f"shuffle_window must be >= 1, got {shuffle_window}")
        if holdout < 0:
            raise ValueError(f"holdout must be >= 0, got {holdout}")
        self.files = [storage.path(f) for f in files]
        self.formats = [detect_format(f) if fmt == "auto" else fmt for f in self.files]
        self.name, self.text_field, self.text_split = name, text_field, text_split
        self.shuffle, self.window, self.on_error = shuffle, shuffle_window, on_error
        self.seed = (seed, zlib.crc32(name.encode()))
        self.shard_index, self.shard_count, self.num_epochs = shard_index, shard_count, num_epochs
        self.stats = SourceStats()
        # records of file k past limits[k] are held out: never yielded (not even counted for sharding)
        self.holdout = holdout
        self.limits = training_limits(self.files, self.formats, holdout, text_split=text_split,
                                      text_field=text_field) if holdout else [None] * len(self.files)

    @property
    def shard_by_file(self) -> bool:
        return len(self.files) >= self.shard_count

    def file_order(self, epoch: int) -> list[int]:
        """The files this host reads in `epoch`, in order."""
        order = list(range(len(self.files)))
        if self.shuffle:
            order = [int(i) for i in np.random.default_rng((*self.seed, epoch)).permutation(len(self.files))]
        return order[self.shard_index::self.shard_count] if self.shard_by_file else order

    def __iter__(self):
        return DocumentIterator(self)

    def __str__(self):
        return f"DocumentSource({self.name}, {len(self.files)} files)"


class DocumentIterator(grain.DatasetIterator):
    def __init__(self, source: DocumentSource):
        super().__init__()
        self._src = source
        self.stats = source.stats
        self._start = {"epoch": 0, "block": 0, "file": 0, "record": 0, "offset": 0, "line": 1, "seq": 0,
                       "epoch_docs": 0, "stats": SourceStats().to_dict()}
        self._load_block()

    # A block: up to `window` of this host's documents read from `self._start`.
    def _load_block(self) -> None:
        src, start = self._src, self._start
        restored = start["stats"]
        self.stats.documents, self.stats.epochs = restored["documents"], restored["epochs"]
        self.stats.skipped = dict(restored["skipped"])
        order = src.file_order(start["epoch"])
        docs: list[str] = []
        file_pos, seq = start["file"], start["seq"]
        cursor = Cursor(start["record"], start["offset"], start["line"])
        while file_pos < len(order) and len(docs) < src.window:
            k = order[file_pos]
            try:
                limit, file_done = src.limits[k], True
                for rec in read_records(src.files[k], src.formats[k], cursor, text_split=src.text_split,
                                        text_field=src.text_field):
                    if limit is not None and rec.next.record > limit:  # held out from here to the file's end
                        break
                    seq += 1
                    cursor = rec.next
                    if not src.shard_by_file and (seq - 1) % src.shard_count != src.shard_index:
                        continue
                    try:
                        docs.append(parse_document(rec.value, src.formats[k], src.text_field))
                    except Malformed as err:
                        if src.on_error == "raise":
                            raise DataError(f"{rec.where}: {err} (data.on_error=raise)") from None
                        self._skip(err.reason)
                        continue
                    if len(docs) == src.window:
                        file_done = False
                        break
                if file_done:
                    file_pos, cursor = file_pos + 1, Cursor()
            except DamagedFile as err:
                if src.on_error == "raise":
                    raise DataError(f"{err} (data.on_error=raise)") from None
                warn_damaged(str(err))
                self._skip("damaged file")
                if err.resume is not None:  # e.g. the next parquet row group
                    cursor = err.resume
                else:
                    file_pos, cursor = file_pos + 1, Cursor()
        self._epoch_end = file_pos >= len(order)
        self._after = {"file": file_pos, "record": cursor.record, "offset": cursor.offset,
                       "line": cursor.line, "seq": seq}
        if src.shuffle and len(docs) > 1:
            perm = np.random.default_rng((*src.seed, start["epoch"], start["block"], 1)).permutation(len(docs))
            docs = [docs[i] for i in perm]
        self._block, self._consumed = docs, 0

    def _skip(self, reason: str) -> None:
        self.stats.skipped[reason] = self.stats.skipped.get(reason, 0) + 1

    def _next_block(self) -> None:
        src, start = self._src, self._start
        epoch_docs = start["epoch_docs"] + len(self._block)
        if self._epoch_end:
            if epoch_docs == 0:
                why = ", ".join(f"{k}: {v}" for k, v in sorted(self.stats.skipped.items())) or "none"
                raise DataError(f"data source '{src.name}': no usable documents for host "
                                f"{src.shard_index} of {src.shard_count} in {len(src.files)} file(s) "
                                f"(first: {src.files[0]}); skipped records: {why}")
            self.stats.epochs += 1
            if src.num_epochs is not None and start["epoch"] + 1 >= src.num_epochs:
                raise StopIteration
            new = {"epoch": start["epoch"] + 1, "block": 0, "file": 0, "record": 0, "offset": 0, "line": 1,
                   "seq": 0, "epoch_docs": 0}
        else:
            new = {"epoch": start["epoch"], "block": start["block"] + 1, **self._after,
                   "epoch_docs": epoch_docs}
        self._start = {**new, "stats": self.stats.to_dict()}
        self._load_block()

    def __next__(self) -> str:
        while self._consumed >= len(self._block):
            self._next_block()
        doc = self._block[self._consumed]
        self._consumed += 1
        self.stats.documents += 1
        return doc

    def get_state(self) -> dict:
        return {**self._start, "consumed": self._consumed}

    def set_state(self, state: dict) -> None:
        state = dict(state)
        consumed = state.pop("consumed")
        self._start = state
        self._load_block()
        if consumed > len(self._block):
            raise DataError(f"data source '{self._src.name}': checkpointed position is past the end of its "
                            f"block (the files changed since the checkpoint?)")
        self._consumed = consumed
        self.stats.documents += consumed
