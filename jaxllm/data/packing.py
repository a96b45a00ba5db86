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

import grain
import numpy as np

ROW_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


class Packer:
    """Streaming concat-then-split packer with a JSON state (the not-yet-emitted tokens)."""

    def __init__(self, seq_len: int, pad_id: int = 0):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.seq_len, self.pad_id = seq_len, pad_id
        self._tokens: list[np.ndarray] = []
        self._docs: list[np.ndarray] = []   # document ordinal of every buffered token
        self._size = 0
        self._next_doc = 0

    def add(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids, np.int32).reshape(-1)
        if ids.size == 0:
            return
        self._tokens.append(ids)
        self._docs.append(np.full(ids.size, self._next_doc, np.int64))
        self._next_doc += 1
        self._size += ids.size

    def ready(self) -> bool:
        return self._size > self.seq_len

    def pop(self) -> dict[str, np.ndarray]:
        """One full row; needs `ready()`. The row's last target stays buffered as the next row's first input."""
        length = self.seq_len
        tokens, docs = np.concatenate(self._tokens), np.concatenate(self._docs)
        row = self._row(tokens[: length + 1], docs[: length + 1])
        self._tokens, self._docs = [tokens[length:]], [docs[length:]]
        self._size = tokens.size - length
        return row

    def flush(self) -> dict[str, np.ndarray] | None:
        """The padded last row of finite data, or None when no target is left."""
        if self._size < 2:
            return None
        tokens, docs = np.concatenate(self._tokens), np.concatenate(self._docs)
        self._tokens, self._docs, self._size = [], [], 0
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

    def get_state(self) -> dict:
        if not self._size:
            return {"tokens": [], "docs": []}
        tokens, docs = np.concatenate(self._tokens), np.concatenate(self._docs)
        return {"tokens": tokens.tolist(), "docs": (docs - docs[0]).tolist()}

    def set_state(self, state: dict) -> None:
        tokens = np.asarray(state["tokens"], np.int32)
        docs = np.asarray(state["docs"], np.int64)
        self._tokens, self._docs = ([tokens], [docs]) if tokens.size else ([], [])
        self._size = tokens.size
        self._next_doc = int(docs[-1]) + 1 if docs.size else 0


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
    def __init__(self, parent, seq_len: int, pad_id: int):
        super().__init__(parent)
        self._packer = Packer(seq_len, pad_id)
        self._exhausted = False

    def __next__(self) -> dict[str, np.ndarray]:
        while not self._packer.ready():
            if self._exhausted:
                row = self._packer.flush()
                if row is None:
                    raise StopIteration
                return row
            try:
                self._packer.add(next(self._parent))
            except StopIteration:
                self._exhausted = True
        return self._packer.pop()

    def get_state(self) -> dict:
        return {"parent": self._parent.get_state(), "packer": self._packer.get_state(),
                "exhausted": self._exhausted}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self._packer.set_state(state["packer"])
        self._exhausted = state["exhausted"]
