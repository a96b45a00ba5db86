"""Packing token documents into fixed rows for next-token training (concatenate, then split).

The documents (each already `[bos] ids [eos]`) form one stream. Row r holds stream tokens
[r·L, r·L + L) as `tokens` and the next L as `targets`, so consecutive rows overlap by one token and no
token is lost. Per row, all int32[seq_len] except `loss_mask` float32[seq_len]:

    tokens        the inputs
    targets       the next token of the stream
    loss_mask     1 where the target is in the same document as the input (the EOS closing a document is
                  the target of its last token; the token after EOS — the next document — is not learnt)
    segment_ids   1, 2, … per document within the row, 0 for padding (attention stays within a segment)
    positions     index within the document, restarting at 0 at the row start for a continued document

Padding appears only at the very end of finite data: token `pad_id`, segment 0, loss_mask 0.
"""
from __future__ import annotations

import collections

import grain
import numpy as np

ROW_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


class Packer:
    """Streaming concat-then-split packer. Its position is small: `first_document` (the ordinal of the oldest
    document with tokens still buffered) and `emitted` (how many of that document's tokens are already
    behind the buffer); a resumable reader re-adds the documents from there and calls `drop(emitted)`."""

    def __init__(self, seq_len: int, pad_id: int = 0):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.seq_len, self.pad_id = seq_len, pad_id
        self._tokens: list[np.ndarray] = []
        self._docs: list[np.ndarray] = []   # document ordinal of every buffered token
        self._size = 0
        self._next_doc = 0
        self.emitted = 0

    def add(self, ids: np.ndarray) -> int | None:
        """Buffer a document; its ordinal, or None for an empty one (nothing buffered)."""
        ids = np.asarray(ids, np.int32).reshape(-1)
        if ids.size == 0:
            return None
        self._tokens.append(ids)
        self._docs.append(np.full(ids.size, self._next_doc, np.int64))
        self._next_doc += 1
        self._size += ids.size
        return self._next_doc - 1

    @property
    def first_document(self) -> int:
        return int(self._docs[0][0]) if self._size else self._next_doc

    def ready(self) -> bool:
        return self._size > self.seq_len

    def _buffer(self) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, ordinals) of the buffer as one array each; kept joined, so a long document is sliced,
        not copied, by each row."""
        if len(self._tokens) != 1:
            self._tokens, self._docs = [np.concatenate(self._tokens)], [np.concatenate(self._docs)]
        return self._tokens[0], self._docs[0]

    def pop(self) -> dict[str, np.ndarray]:
        """One full row; needs `ready()`. The row's last target stays buffered as the next row's first input."""
        length = self.seq_len
        tokens, docs = self._buffer()
        row = self._row(tokens[: length + 1], docs[: length + 1])
        self._keep_from(tokens, docs, length)
        return row

    def drop(self, count: int) -> None:
        """Forget the first `count` buffered tokens (restoring a position: they were emitted before)."""
        if count:
            self._keep_from(*self._buffer(), count)

    def _keep_from(self, tokens: np.ndarray, docs: np.ndarray, start: int) -> None:
        first = int(np.searchsorted(docs, docs[start]))  # where the new first document begins
        self.emitted = (self.emitted if first == 0 else 0) + start - first
        self._tokens, self._docs = [tokens[start:]], [docs[start:]]
        self._size = tokens.size - start

    def flush(self) -> dict[str, np.ndarray] | None:
        """The padded last row of finite data, or None when no target is left."""
        if self._size < 2:
            return None
        tokens, docs = self._buffer()
        self._tokens, self._docs, self._size, self.emitted = [], [], 0, 0
        return self._row(tokens, docs)

    def _row(self, stream: np.ndarray, docs: np.ndarray) -> dict[str, np.ndarray]:
        """Row from 2..seq_len+1 stream tokens: inputs are the first (up to seq_len), targets the next ones."""
        n_in, n_out = min(stream.size, self.seq_len), stream.size - 1
        row = {k: np.zeros(self.seq_len, np.int32) for k in ("tokens", "targets", "segment_ids", "positions")}
        row["loss_mask"] = np.zeros(self.seq_len, np.float32)
        row["tokens"][:] = self.pad_id
        row["tokens"][:n_in] = stream[:n_in]
        row["targets"][:n_out] = stream[1:n_out + 1]
        row["loss_mask"][:n_out] = docs[:n_out] == docs[1:n_out + 1]
        in_docs = docs[:n_in]
        segments = (in_docs - in_docs[0] + 1).astype(np.int32)  # ordinals are consecutive
        row["segment_ids"][:n_in] = segments
        starts = np.flatnonzero(np.r_[True, in_docs[1:] != in_docs[:-1]])
        row["positions"][:n_in] = np.arange(n_in) - starts[segments - 1]
        return row

    def contents(self) -> dict:
        """The buffered tokens themselves (the state format of checkpoints written before positions)."""
        if not self._size:
            return {"tokens": [], "docs": []}
        tokens, docs = self._buffer()
        return {"tokens": tokens.tolist(), "docs": (docs - docs[0]).tolist()}

    def load_contents(self, state: dict) -> int:
        """Restore from `contents()`; the ordinal the next added document gets."""
        tokens = np.asarray(state["tokens"], np.int32)
        docs = np.asarray(state["docs"], np.int64)
        self._tokens, self._docs = ([tokens], [docs]) if tokens.size else ([], [])
        self._size = tokens.size
        self._next_doc = int(docs[-1]) + 1 if docs.size else 0
        return self._next_doc


def pack(documents, seq_len: int, pad_id: int = 0, finite: bool = True):
    """Rows from an iterable of token arrays (the pure-Python form of `PackedRows`)."""
    packer = Packer(seq_len, pad_id)
    for ids in documents:
        packer.add(ids)
        while packer.ready():
            yield packer.pop()
    if finite and (row := packer.flush()) is not None:
        yield row


class PackedRows(grain.IterDataset):
    """grain transformation: token documents → packed rows (dicts of `ROW_KEYS`)."""

    def __init__(self, parent: grain.IterDataset, seq_len: int, pad_id: int = 0):
        super().__init__(parent)
        self.seq_len, self.pad_id = seq_len, pad_id

    def __iter__(self):
        return _PackedRowsIterator(self._parent.__iter__(), self.seq_len, self.pad_id)

    def __str__(self):
        return f"PackedRows(seq_len={self.seq_len})"


class _PackedRowsIterator(grain.DatasetIterator):
    """The state is a position, not the buffered tokens: the parent's state before the oldest document still
    buffered, how many parent elements were read since, and how many tokens of that document were already
    emitted. Restoring re-reads those few documents (a 10 MB document costs a re-tokenisation, not a
    100 MB JSON file in every checkpoint)."""

    def __init__(self, parent, seq_len: int, pad_id: int):
        super().__init__(parent)
        self._seq_len, self._pad_id = seq_len, pad_id
        self._packer = Packer(seq_len, pad_id)
        self._exhausted = False
        self._fetched: collections.deque = collections.deque()  # (parent state before, ordinal or None)
        self._legacy_end = 0  # documents restored from an old contents state (not re-readable)

    def _fetch(self) -> None:
        before = self._parent.get_state()
        ids = next(self._parent)
        self._fetched.append((before, self._packer.add(ids)))

    def _forget_emitted(self) -> None:
        first = self._packer.first_document
        while self._fetched and (self._fetched[0][1] is None or self._fetched[0][1] < first):
            self._fetched.popleft()

    def __next__(self) -> dict[str, np.ndarray]:
        while not self._packer.ready():
            if self._exhausted:
                row = self._packer.flush()
                self._forget_emitted()
                if row is None:
                    raise StopIteration
                return row
            try:
                self._fetch()
            except StopIteration:
                self._exhausted = True
        row = self._packer.pop()
        self._forget_emitted()
        return row

    def get_state(self) -> dict:
        if self._packer.first_document < self._legacy_end:
            return {"parent": self._parent.get_state(), "packer": self._packer.contents(),
                    "exhausted": self._exhausted}
        anchor = self._fetched[0][0] if self._fetched else self._parent.get_state()
        return {"parent": anchor, "reread": len(self._fetched), "emitted": self._packer.emitted,
                "exhausted": self._exhausted}

    def set_state(self, state: dict) -> None:
        self._packer = Packer(self._seq_len, self._pad_id)
        self._fetched.clear()
        self._parent.set_state(state["parent"])
        self._exhausted = state["exhausted"]
        self._legacy_end = 0
        if "packer" in state:  # written before positions: the tokens themselves
            self._legacy_end = self._packer.load_contents(state["packer"])
            return
        for _ in range(state["reread"]):
            self._fetch()
        self._packer.drop(state["emitted"])
