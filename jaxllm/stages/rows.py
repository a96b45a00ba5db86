"""Batches of in-memory rows with a resumable, epoch-shuffled order (SFT, DPO and RM datasets are small)."""
from __future__ import annotations

import numpy as np


class RowIterator:
    """Yields dicts of [batch_size, ...] arrays from `rows` (dict of [n, ...] arrays).

    Host `shard_index` of `shard_count` takes rows shard_index::shard_count. Each epoch is a fresh
    permutation drawn from (seed, epoch); the state is {"epoch", "offset"}, so a restored iterator continues
    with exactly the batches an uninterrupted run would have seen.
    """

    finite = False  # epochs repeat: the train loop need not check across hosts for an end

    def __init__(self, rows: dict, batch_size: int, seed: int = 0, shard_index: int = 0, shard_count: int = 1,
                 stats: dict | None = None):
        self.rows = {k: v[shard_index::shard_count] for k, v in rows.items()}
        self.n = len(next(iter(self.rows.values())))
        if self.n == 0:
            raise ValueError(f"no training rows for host {shard_index} of {shard_count}")
        self.batch_size, self.seed = batch_size, seed
        self.epoch, self.offset = 0, 0
        self._stats = stats or {}

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        picked = []
        while len(picked) < self.batch_size:
            order = self._order(self.epoch)
            take = order[self.offset:self.offset + self.batch_size - len(picked)]
            picked.extend(take.tolist())
            self.offset += len(take)
            if self.offset >= self.n:
                self.epoch, self.offset = self.epoch + 1, 0
        index = np.asarray(picked)
        return {k: v[index] for k, v in self.rows.items()}

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def set_state(self, state: dict) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])

    def stats(self) -> dict:
        return {**self._stats, "epoch": self.epoch}
