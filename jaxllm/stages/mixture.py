"""Weighted data sources for the row-based stages (SFT, DPO, RM), with pretraining's semantics: each entry
of `data.sources` has a `weight`, its share of what the run trains on, and small sources repeat.

The share is over `stage.mix_by`: `tokens` (non-padding tokens, as pretraining's weights are shares of
training tokens) or `examples` (conversations for SFT, preference pairs for DPO/RM). `stage.weights`
("zh:4,en:1") sets weights by source name on the command line; weight 0 leaves a source out.
"""
from __future__ import annotations

import numpy as np

from jaxllm.config import ConfigError
from jaxllm.stages.rows import MixtureIterator, RowIterator, Source, rows_per_epoch


def parse_weights(value) -> dict[str, float] | None:
    """`"zh:4,en:1"` or `{zh: 4, en: 1}` → {"zh": 4.0, "en": 1.0}; None stays None."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        pairs = {}
        for item in value.split(","):
            name, sep, weight = item.strip().rpartition(":")
            if not sep or not name.strip():
                raise ConfigError(f"stage.weights must look like 'zh:4,en:1' (source name: weight), got {value!r}")
            pairs[name.strip()] = weight.strip()
        value = pairs
    if not isinstance(value, dict):
        raise ConfigError(f"stage.weights must be 'name:weight,...' or a mapping, got {value!r}")
    out = {}
    for name, weight in value.items():
        try:
            out[str(name)] = float(weight)
        except (TypeError, ValueError):
            raise ConfigError(f"stage.weights: the weight of '{name}' must be a number, got {weight!r}") from None
        if not out[str(name)] >= 0:
            raise ConfigError(f"stage.weights: the weight of '{name}' must be >= 0, got {weight!r}")
    return out


def stage_sources(config, weights: dict[str, float] | None) -> list[tuple[str, list, float]]:
    """[(name, files, weight)] for `data.sources` with `weights` (by name) applied; a source at weight 0
    is left out and its files are not read."""
    from jaxllm.data import expand_paths

    if not config.data.sources:
        raise ConfigError("data.sources is empty: give the jsonl file(s) of this stage")
    specs = config.data.resolved_sources()
    chosen = {s.name: float(s.weight) for s in specs}
    for name, weight in (weights or {}).items():
        if name not in chosen:
            raise ConfigError(f"stage.weights names source '{name}', but data.sources are named "
                              f"{', '.join(chosen)} (set data.sources.N.name)")
        chosen[name] = weight
    out = [(s.name, expand_paths(s.path, f"data.sources.{i}.path"), chosen[s.name])
           for i, s in enumerate(specs) if chosen[s.name] > 0]
    if not out:
        raise ConfigError("stage.weights leaves every data source at weight 0")
    return out


def packed_source(name: str, rows: dict, weight: float) -> Source:
    """A source of packed SFT rows [n, seq]: examples = segments per row."""
    segments = rows["segment_ids"]
    return Source(name, rows, weight, examples=segments.max(axis=-1).astype(np.int64),
                  tokens=(segments > 0).sum(axis=-1).astype(np.int64))


def pair_source(name: str, rows: dict, weight: float) -> Source:
    """A source of preference rows [n, 2, seq]: one pair per row."""
    segments = rows["segment_ids"]
    return Source(name, rows, weight, examples=np.ones(len(segments), np.int64),
                  tokens=(segments > 0).reshape(len(segments), -1).sum(axis=-1).astype(np.int64))


def describe(sources: list[Source], unit: str, what: str) -> str:
    """The configured mixture, and how often one epoch of it (as many rows as the sources hold) passes
    over each source."""
    total = sum(s.weight for s in sources)
    passes = [rows / len(s) for s, rows in zip(sources, rows_per_epoch(sources, unit))]
    parts = [f"{s.name} {s.weight / total:.1%} (weight {s.weight:g}; {int(s.examples.sum()):,} examples, "
             f"{int(s.tokens.sum()):,} tokens in {len(s):,} rows; {p:.2f} passes per epoch)"
             for s, p in zip(sources, passes)]
    return f"{what} mixture by {unit}: " + ", ".join(parts)


def batches(sources: list[Source], unit: str, batch_rows: int, seed: int, shard_index: int, shard_count: int,
            stats: dict, log, what: str):
    """This host's batch iterator: one source's rows in epoch-shuffled order, or the weighted mixture."""
    if len(sources) == 1:
        return RowIterator(sources[0].rows, batch_rows, seed, shard_index, shard_count, stats)
    return MixtureIterator(sources, batch_rows, unit=unit, seed=seed, shard_index=shard_index,
                           shard_count=shard_count, stats=stats, log=log, what=what)
