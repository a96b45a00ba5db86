"""Batches of in-memory rows with a resumable, epoch-shuffled order (SFT, DPO and RM datasets are small)."""
from __future__ import annotations

import numpy as np


class RowIterator:
    """Yields dicts of [batch_size, ...] arrays from `rows` (dict of [n, ...] arrays).

    Each epoch is a fresh permutation of all rows drawn from (seed, epoch), read in global batches of
    batch_size × shard_count rows, of which host `shard_index` takes the shard_index-th slice: the global
    batch is the same however many hosts share it, so 2 hosts train on what 1 would. The state is
    {"epoch", "offset"} (the same on every host), so a restored iterator continues with exactly the batches
    an uninterrupted run would have seen.
    """

    finite = False  # epochs repeat: the train loop need not check across hosts for an end

    def __init__(self, rows: dict, batch_size: int, seed: int = 0, shard_index: int = 0, shard_count: int = 1,
                 stats: dict | None = None):
        self.rows = rows
        self.n = len(next(iter(self.rows.values())))
        if self.n == 0:
            raise ValueError("no training rows")
        self.batch_size, self.seed = batch_size, seed
        self.shard_index, self.shard_count = shard_index, shard_count
        self.epoch, self.offset = 0, 0
        self._stats = stats or {}

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        picked, size = [], self.batch_size * self.shard_count
        while len(picked) < size:
            order = self._order(self.epoch)
            take = order[self.offset:self.offset + size - len(picked)]
            picked.extend(take.tolist())
            self.offset += len(take)
            if self.offset >= self.n:
                self.epoch, self.offset = self.epoch + 1, 0
        index = np.asarray(picked[self.shard_index * self.batch_size:(self.shard_index + 1) * self.batch_size])
        return {k: v[index] for k, v in self.rows.items()}

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def set_state(self, state: dict) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])

    def stats(self) -> dict:
        return {**self._stats, "epoch": self.epoch}
