"""A training stage is a data pipeline plus a loss; the loop (`jaxllm.train.loop.train`) owns the rest.

    Stage(loss_fn, make_data)                              pretraining, SFT, DPO, reward model, ...
      loss_fn(params, batch, rng) -> (loss, metrics)       see `jaxllm.train.loss`
      make_data(rows, seed, shard_index, shard_count)      -> iterator of this host's batches (dicts of
                                                              numpy [rows, ...]) with get_state()/set_state()
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

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
    prepare: Callable | None = None        # mesh -> None: work on the mesh before the data is made; a LoRA
                                           # run also passes start=(the starting parameters: base + adapters)
    lm_path: tuple = ()                    # where the language model sits in the params (RM: ("backbone",))
    tokens_per_row: int | None = None      # for tokens/s and MFU (default: data.seq_len)
    num_rows: int | None = None            # training rows over all hosts, when known (train.epochs)
    tokenizer_path: str | None = None      # copied to RUN/tokenizer.model


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

    return Stage(loss_fn=lm_loss(config.model), make_data=make_data, name="pretrain",
                 tokens_per_row=data.seq_len, tokenizer_path=resolve_path(data.tokenizer))
