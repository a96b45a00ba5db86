"""A training stage is a data pipeline plus a loss; the loop (`jaxllm.train.loop.train`) owns the rest.

    Stage(loss_fn, make_data)                              pretraining, SFT, DPO, reward model, ...
      loss_fn(params, batch, rng) -> (loss, metrics)       see `jaxllm.train.loss`
      make_data(rows, seed, shard_index, shard_count)      -> iterator of this host's batches (dicts of
                                                              numpy [rows, ...]) with get_state()/set_state()
      batch_shapes(rows)                                   -> {key: ShapeDtypeStruct [rows, ...]}: the layout
                                                              of those batches, known without the data

A stage built without its data (`make_data=None`, e.g. `pretraining_objective`) still has its loss,
parameter structure and batch layout: enough to compile its step (`jaxllm.preflight.train`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np

from jaxllm.config import ConfigError
from jaxllm.data import expand_paths, load_tokenizer, pretraining_batches, resolve_path
from jaxllm.train.config import RunConfig
from jaxllm.train.loss import lm_loss


@dataclasses.dataclass
class Stage:
    loss_fn: Callable
    make_data: Callable[[int, int, int, int], Any]
    name: str = "pretrain"
    # Trainable parameters when they are not the model's (e.g. a backbone plus a value head); a stage
    # with its own initialiser also owns `init_from` (the loop does not load it):
    init_params: Callable | None = None    # rng -> params pytree (random; jitted by the loop)
    param_axes: Any = None                 # pytree of logical PartitionSpecs matching init_params
    # A new run's parameters read from a checkpoint, laid out on the given shardings (rng, shardings) ->
    # params. Called outside jit: a jitted closure over loaded weights would embed them as constants.
    load_params: Callable | None = None
    prepare: Callable | None = None        # (mesh, StartingModel) -> None: work on the mesh before the data
                                           # is made, reading the frozen starting model (`train.split`)
    lm_path: tuple = ()                    # where the language model sits in the params (RM: ("backbone",))
    tokens_per_row: int | None = None      # for tokens/s and MFU (default: data.seq_len)
    num_rows: int | None = None            # training rows over all hosts, when known (train.epochs)
    tokenizer_path: str | None = None      # copied to RUN/tokenizer.model
    batch_shapes: Callable[[int], dict] | None = None  # rows -> {key: jax.ShapeDtypeStruct [rows, ...]}


def shapes_like(empty: dict) -> Callable[[int], dict]:
    """batch_shapes from a stage's arrays with no rows (its encoder run on nothing), so the layout a
    pre-flight compiles is the one its data pipeline makes."""
    return lambda rows: {k: jax.ShapeDtypeStruct((rows, *v.shape[1:]), v.dtype) for k, v in empty.items()}


def lm_rows(seq_len: int) -> dict:
    """No rows of packed next-token data (pretraining and SFT): tokens, targets, segment_ids, positions
    int32 and loss_mask float32, [0, seq_len] (`jaxllm.data.packing`, `jaxllm.stages.data.pack_examples`)."""
    rows = {k: np.zeros((0, seq_len), np.int32) for k in ("tokens", "targets", "segment_ids", "positions")}
    return {**rows, "loss_mask": np.zeros((0, seq_len), np.float32)}


def pretraining_objective(config: RunConfig) -> Stage:
    """Pretraining's loss and batch layout without its data or tokenizer (`make_data` is None)."""
    return Stage(loss_fn=lm_loss(config.model), make_data=None, name="pretrain", tokens_per_row=config.data.seq_len,
                 batch_shapes=shapes_like(lm_rows(config.data.seq_len)))


def pretraining_stage(config: RunConfig) -> Stage:
    """Next-token loss (with the model's max-z weight) on `config.data`'s packed, mixed sources."""
    data = config.data
    data.validate()
    if not data.tokenizer:
        raise ConfigError("data.tokenizer is required: a sentencepiece model (e.g. assets:demo/tokenizer.model)")
    for index, source in enumerate(data.sources):  # fail before the run directory is created
        expand_paths(source.path, f"data.sources.{index}.path")
    tokenizer = load_tokenizer(data.tokenizer)
    if tokenizer.vocab_size > config.model.vocab_size:
        raise ConfigError(f"data.tokenizer has {tokenizer.vocab_size} pieces but model.vocab_size is "
                          f"{config.model.vocab_size}")

    def make_data(rows, seed, shard_index, shard_count):
        return pretraining_batches(data, tokenizer, batch_size=rows, seed=seed, shard_index=shard_index,
                                   shard_count=shard_count)

    return dataclasses.replace(pretraining_objective(config), make_data=make_data,
                               tokenizer_path=resolve_path(data.tokenizer))
