"""The pretraining pipeline: sources → tokenize → pack per source → weighted mix → batch → prefetch.

Mixing happens after packing, so a source's weight is its share of rows, i.e. of training tokens (a code
source with long documents does not crowd out the others). Every stage is a grain `IterDataset`, so the
whole iterator state is one JSON dict that the trainer saves in each checkpoint.
"""
from __future__ import annotations

import atexit
import weakref

import grain
import numpy as np

from jaxllm.data.config import DataConfig
from jaxllm.data.files import expand_paths
from jaxllm.data.packing import PackedRows
from jaxllm.data.sources import DocumentSource
from jaxllm.data.tokenize import Tokenize


def _shard(shard_index, shard_count):
    if shard_index is None or shard_count is None:
        import jax
        return jax.process_index(), jax.process_count()
    return shard_index, shard_count


def build_dataset(config: DataConfig, tokenizer, *, batch_size: int, seed: int = 0,
                  shard_index: int | None = None, shard_count: int | None = None):
    """(grain.IterDataset of batches, [DocumentSource]) for this host.

    Each batch is a dict of `batch_size` packed rows: tokens/targets/segment_ids/positions int32 and
    loss_mask float32, all [batch_size, seq_len]. Host `shard_index` of `shard_count` (default: this JAX
    process) reads every `shard_count`-th record, so hosts see disjoint documents.
    """
    config.validate()
    shard_index, shard_count = _shard(shard_index, shard_count)
    tokenize = Tokenize(tokenizer, config.add_bos, config.add_eos)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None and tokenizer.pad_id >= 0 else 0
    sources, packed, weights = [], {}, {}
    for index, spec in enumerate(config.resolved_sources()):
        source = DocumentSource(
            expand_paths(spec.path, f"data.sources.{index}.path"), name=spec.name, fmt=spec.format,
            text_field=spec.text_field, text_split=spec.text_split, shuffle=config.shuffle,
            shuffle_window=config.shuffle_window, seed=seed, shard_index=shard_index,
            shard_count=shard_count, on_error=config.on_error, num_epochs=config.num_epochs,
            holdout=spec.holdout)
        sources.append(source)
        packed[spec.name] = PackedRows(source.map(tokenize), config.seq_len, pad_id)
        weights[spec.name] = float(spec.weight)
    rows = next(iter(packed.values())) if len(packed) == 1 else grain.IterDataset.mix(packed, weights)
    dataset = rows.batch(batch_size, drop_remainder=True)
    if config.prefetch:
        dataset = grain.experimental.ThreadPrefetchIterDataset(dataset, prefetch_buffer_size=config.prefetch)
    return dataset, sources


# Iterators still open at interpreter exit are closed before modules are torn down (grain's __del__ would
# otherwise fail in its prefetch thread's clean-up and print a traceback).
_open_iterators: "weakref.WeakSet[DataIterator]" = weakref.WeakSet()


@atexit.register
def _close_open_iterators() -> None:
    for iterator in list(_open_iterators):
        iterator.close()


class DataIterator(grain.DatasetIterator):
    """The iterator the trainer consumes: batches, a JSON state, and counters for the metrics log."""

    def __init__(self, dataset, sources):
        self._built = False  # iter() may fail (a damaged first file): then there is nothing to close
        inner = iter(dataset)
        super().__init__(inner)
        self._built = True
        _open_iterators.add(self)
        self.sources = sources
        self.finite = any(source.num_epochs is not None for source in sources)  # it can run out

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._parent)

    def get_state(self) -> dict:
        return self._parent.get_state()

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state)

    def close(self) -> None:
        """Stop the prefetch thread and drop the pipeline now (not at interpreter exit)."""
        if not self.__dict__.get("_built"):
            return
        _open_iterators.discard(self)
        super().close()
        self._parents = ()

    def stats(self) -> dict:
        """{'documents', 'skipped', 'skipped/<reason>', 'epochs/<source>'} for this host."""
        out = {"documents": 0, "skipped": 0}
        for source in self.sources:
            stats = source.stats
            out["documents"] += stats.documents
            out[f"epochs/{source.name}"] = stats.epochs
            for reason, count in stats.skipped.items():
                out["skipped"] += count
                out[f"skipped/{reason}"] = out.get(f"skipped/{reason}", 0) + count
        return out


def heldout_texts(config: DataConfig) -> dict[str, list[str]]:
    """{source name: its held-out documents} for the sources with a `holdout` (the last N records, which
    training never reads)."""
    from jaxllm.data.sources import heldout_documents
    return {spec.name: heldout_documents(expand_paths(spec.path, f"data.sources.{i}.path"), spec.holdout,
                                         fmt=spec.format, text_field=spec.text_field, text_split=spec.text_split)
            for i, spec in enumerate(config.resolved_sources()) if spec.holdout}


def pretraining_batches(config: DataConfig, tokenizer, *, batch_size: int, seed: int = 0,
                        shard_index: int | None = None, shard_count: int | None = None) -> DataIterator:
    """A `DataIterator` over this host's batches (see `build_dataset`)."""
    dataset, sources = build_dataset(config, tokenizer, batch_size=batch_size, seed=seed,
                                     shard_index=shard_index, shard_count=shard_count)
    return DataIterator(dataset, sources)
