"""Batches of in-memory rows with a resumable, epoch-shuffled order (SFT, DPO and RM datasets are small),
from one row set or from several weighted sources."""
from __future__ import annotations

import dataclasses

import numpy as np

MIX_UNITS = ("tokens", "examples")


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


@dataclasses.dataclass
class Source:
    """One weighted source of rows: `rows` a dict of [n, ...] arrays; `examples` and `tokens` int[n], the
    examples (conversations, or preference pairs) and the non-padding tokens each row holds."""
    name: str
    rows: dict
    weight: float
    examples: np.ndarray
    tokens: np.ndarray

    def shard(self, index: int, count: int) -> "Source":
        return Source(self.name, {k: v[index::count] for k, v in self.rows.items()}, self.weight,
                      self.examples[index::count], self.tokens[index::count])

    def __len__(self) -> int:
        return len(self.examples)


def rows_per_epoch(sources: list[Source], unit: str) -> list[float]:
    """Expected rows drawn from each source per epoch of the mixture (as many rows as all sources hold):
    a source's row rate is its weight over its mean `unit` per row."""
    rates = [s.weight / float(np.mean(getattr(s, unit))) for s in sources]
    total = sum(len(s) for s in sources)
    return [total * r / sum(rates) for r in rates]


class MixtureIterator:
    """Batches of rows drawn from weighted `sources`, so that each source's share of the `unit` drawn
    (`tokens`: non-padding tokens, as pretraining's weights are shares of training tokens; or `examples`)
    follows its normalised weight.

    Each source is read in its own epoch-shuffled order (permutations from (seed, source index, epoch));
    its rows repeat once exhausted, so a small source is upsampled. The next row comes from the source
    whose count would stay lowest relative to its weight after taking it (weighted fair queueing), which is
    deterministic and keeps every source within one row of its exact share at every step. Host
    `shard_index` of `shard_count` mixes its own shard of every source (each host's ratio is exact, so the
    global one is too). The state is the rows, examples and tokens drawn per source: a restored iterator
    continues with exactly the batches an uninterrupted run would have seen.

    `log`: called once, at `close()` (the end of the run), with the realised mixture on host 0.
    """

    finite = False

    def __init__(self, sources: list[Source], batch_size: int, *, unit: str = "tokens", seed: int = 0,
                 shard_index: int = 0, shard_count: int = 1, stats: dict | None = None, log=None,
                 what: str = "data"):
        if unit not in MIX_UNITS:
            raise ValueError(f"unit must be one of {MIX_UNITS}, got {unit!r}")
        self.sources = [s.shard(shard_index, shard_count) for s in sources]
        for s in self.sources:
            if not len(s):
                raise ValueError(f"source '{s.name}' has no training rows for host {shard_index} of {shard_count}")
            if s.weight <= 0:
                raise ValueError(f"source '{s.name}' has weight {s.weight}; weights must be > 0")
        total = sum(s.weight for s in self.sources)
        self.targets = [s.weight / total for s in self.sources]
        self.unit, self.batch_size, self.seed = unit, batch_size, seed
        self.primary = shard_index == 0
        self._stats, self._log, self._what = stats or {}, log, what
        self._orders: dict[int, tuple[int, np.ndarray]] = {}
        self.drawn = {key: [0] * len(self.sources) for key in ("rows", "examples", "tokens")}

    def _row(self, i: int) -> int:
        """The index of source i's next row."""
        n = len(self.sources[i])
        epoch, offset = divmod(self.drawn["rows"][i], n)
        cached = self._orders.get(i)
        if cached is None or cached[0] != epoch:
            cached = (epoch, np.random.default_rng([self.seed, i, epoch]).permutation(n))
            self._orders[i] = cached
        return int(cached[1][offset])

    def _take(self) -> tuple[int, int]:
        used = self.drawn[self.unit]
        best, best_key = 0, None
        for i, s in enumerate(self.sources):
            row = self._row(i)
            key = (used[i] + int(getattr(s, self.unit)[row])) / self.targets[i]
            if best_key is None or key < best_key:
                best, best_key = i, key
        row = self._row(best)
        s = self.sources[best]
        self.drawn["rows"][best] += 1
        self.drawn["examples"][best] += int(s.examples[row])
        self.drawn["tokens"][best] += int(s.tokens[row])
        return best, row

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        picks = [self._take() for _ in range(self.batch_size)]
        keys = self.sources[0].rows.keys()
        return {k: np.stack([self.sources[i].rows[k][r] for i, r in picks]) for k in keys}

    def get_state(self) -> dict:
        return {key: list(values) for key, values in self.drawn.items()}

    def set_state(self, state: dict) -> None:
        for key in self.drawn:
            values = [int(v) for v in state[key]]
            if len(values) != len(self.sources):
                raise ValueError(f"the checkpoint's data state has {len(values)} sources, this run has "
                                 f"{len(self.sources)}: the data sources changed since it was saved")
            self.drawn[key] = values

    def shares(self, unit: str | None = None) -> list[float]:
        """Realised share of `unit` (default: the mixing unit) per source, on this host."""
        counts = self.drawn[unit or self.unit]
        total = sum(counts)
        return [c / total if total else 0.0 for c in counts]

    def stats(self) -> dict:
        """Counters for the metrics log: realised share and passes (epochs) per source."""
        out = dict(self._stats)
        for s, share, rows in zip(self.sources, self.shares(), self.drawn["rows"]):
            out[f"mix/{s.name}"] = share
            out[f"passes/{s.name}"] = rows / len(s)
        return out

    def summary(self) -> str:
        """One line: the realised mixture against the configured one."""
        rows = sum(self.drawn["rows"])
        parts = [f"{s.name} {share:.1%} (target {target:.1%}; {examples:,} examples, {tokens:,} tokens, "
                 f"{rows_i / len(s):.2f} passes)"
                 for s, share, target, examples, tokens, rows_i in zip(
                     self.sources, self.shares(), self.targets, self.drawn["examples"], self.drawn["tokens"],
                     self.drawn["rows"])]
        return f"{self._what} mixture by {self.unit} over {rows:,} rows on this host: " + ", ".join(parts)

    def close(self) -> None:
        if self._log is not None and self.primary and sum(self.drawn["rows"]):
            self._log(self.summary())
        self._log = None
