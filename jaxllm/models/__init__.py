"""Functional model API: parameters are a plain pytree; the model a pure function of them."""
from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm import sharding
from jaxllm.config import ModelConfig
from jaxllm.models.decoder import Decoder
from jaxllm.models.kv_cache import KV_CACHE_AXES, init_kv_cache, kv_cache_axes
from jaxllm.models.presets import PRESETS, PUBLISHED, get_preset

__all__ = ["Decoder", "ModelConfig", "PRESETS", "PUBLISHED", "get_preset", "init_params", "forward", "head_logits",
           "output_matrix", "init_kv_cache", "kv_cache_axes", "KV_CACHE_AXES", "param_shapes", "param_logical_axes",
           "param_shardings",
           "count_params", "unroll_layers", "is_unrolled", "decoding_layout"]


def _dummy_tokens():
    return jnp.zeros((1, 1), jnp.int32)


def _for_init(config: ModelConfig) -> ModelConfig:
    # the parameters do not depend on the attention path, and a forced fused kernel refuses the dummy length 1
    return dataclasses.replace(config, attention="reference") if config.attention != "reference" else config


@functools.lru_cache(maxsize=64)
def _boxed_shapes(config: ModelConfig):
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
    return jax.eval_shape(lambda r: Decoder(_for_init(config)).init(jax.random.wrap_key_data(r), _dummy_tokens()),
                          rng)["params"]


def param_shapes(config: ModelConfig):
    """Pytree of `jax.ShapeDtypeStruct`, computed without allocating."""
    return nn.unbox(_boxed_shapes(config))


def param_logical_axes(config: ModelConfig):
    """Pytree of logical `PartitionSpec`s (e.g. ('layers', 'embed', 'heads', 'head_dim'))."""
    return nn.get_partition_spec(_boxed_shapes(config))


def param_shardings(config: ModelConfig, mesh, rules=sharding.LOGICAL_RULES):
    """Pytree of `NamedSharding`s of the parameters on `mesh`, by the rules table."""
    return sharding.tree_shardings(param_logical_axes(config), param_shapes(config), mesh, rules)


def count_params(config: ModelConfig) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(param_shapes(config)))


def init_params(config: ModelConfig, rng: jax.Array, shardings=None):
    """Random parameters (normal(initializer_range), norms at one). With `shardings` (a pytree of
    `NamedSharding` matching `param_shapes`) each device materialises only its own shard."""
    init = jax.jit(lambda r: nn.unbox(Decoder(_for_init(config)).init(r, _dummy_tokens())["params"]),
                   out_shardings=shardings)
    return init(rng)


def forward(config: ModelConfig, params, tokens, positions=None, segment_ids=None, kv_cache=None, *,
            return_hidden: bool = False, last_only: bool = False, rng: jax.Array | None = None):
    """logits float32[batch, len, vocab] (len 1 with `last_only`), and the new cache when `kv_cache` is
    given. `rng`: training randomness (LoRA dropout); None is the deterministic forward."""
    return Decoder(config, unrolled=is_unrolled(params)).apply({"params": params}, tokens, positions, segment_ids, kv_cache,
                                 return_hidden=return_hidden, last_only=last_only,
                                 rngs=None if rng is None else {"dropout": rng})


def head_logits(config: ModelConfig, params, hidden, matrix=None):
    """What `forward` ends with: float32 logits of `forward(..., return_hidden=True)`'s hidden states;
    `matrix`: `output_matrix(config, params)` computed once by the caller."""
    return Decoder(config, unrolled=is_unrolled(params)).apply({"params": params}, hidden, matrix,
                                                               method=Decoder.head_logits)


def output_matrix(config: ModelConfig, params):
    """The output layer's [embed, vocab] matrix in the compute dtype (NormHead rows normalised)."""
    return Decoder(config, unrolled=is_unrolled(params)).apply({"params": params}, method=Decoder.output_matrix)


def is_unrolled(params) -> bool:
    """Whether `params` are in `unroll_layers`'s per-layer layout."""
    return "blocks_0" in params


@jax.jit
def _unroll(params):
    layers = params["layers"]
    count = jax.tree.leaves(layers)[0].shape[0]
    rest = {k: v for k, v in params.items() if k != "layers"}
    return {**rest, **{f"blocks_{i}": jax.tree.map(lambda x: x[i], layers) for i in range(count)}}


def unroll_layers(params):
    """The parameters with the layer-stacked subtree `layers` split into one subtree per layer (`blocks_0`
    …, what `Decoder(unrolled=True)` reads); `forward` takes either layout. A new copy of the layer
    weights: drop the stacked ones when they are no longer needed."""
    return params if is_unrolled(params) else _unroll(params)


def decoding_layout(params):
    """The layout decoding runs fastest with on the devices in context: per layer on CPU (XLA:CPU copies a
    layer's slice of a stacked weight before each matmul: for a batch-1 step, most of the time), stacked
    elsewhere (GPU and TPU compilers read the slice in place, and a second copy of the weights would not fit)."""
    from jaxllm.models.attention import target_platform

    return unroll_layers(params) if target_platform() == "cpu" else params
