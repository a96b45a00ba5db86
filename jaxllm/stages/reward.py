"""Reward (and value) models: the decoder backbone (`head="none"`) plus a scalar head.

Params: {"backbone": decoder params without `lm_head`, "head": {"kernel": [embed], "bias": []}}.
Llama 2 initialises the reward model from the chat checkpoint and replaces the LM head by a regression head.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxllm.config import ModelConfig
from jaxllm.models import forward, param_logical_axes


def backbone_config(config: ModelConfig) -> ModelConfig:
    return config.replace(head="none")


def from_lm_params(lm_params: dict, config: ModelConfig, rng: jax.Array) -> dict:
    """Reward-model params from language-model params: drop `lm_head`, add a small random scalar head."""
    backbone = {k: v for k, v in lm_params.items() if k != "lm_head"}
    kernel = jax.random.normal(rng, (config.hidden_size,), jnp.float32) / jnp.sqrt(config.hidden_size)
    return {"backbone": backbone, "head": {"kernel": kernel, "bias": jnp.zeros((), jnp.float32)}}


def logical_axes(config: ModelConfig) -> dict:
    return {"backbone": param_logical_axes(backbone_config(config)),
            "head": {"kernel": P("norm"), "bias": P()}}


def scores(config: ModelConfig, params: dict, tokens, positions, segment_ids, last, rng=None) -> jax.Array:
    """Scalar reward per sequence, read at its last token: float32[batch] for tokens [batch, seq],
    last int32[batch]. `rng`: training randomness (LoRA dropout)."""
    hidden = forward(backbone_config(config), params["backbone"], tokens, positions, segment_ids, rng=rng)
    final = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0].astype(jnp.float32)
    return final @ params["head"]["kernel"] + params["head"]["bias"]


def token_values(config: ModelConfig, params: dict, tokens, positions=None, segment_ids=None) -> jax.Array:
    """Per-token scalar outputs float32[batch, seq] (a PPO value head over the same backbone)."""
    hidden = forward(backbone_config(config), params["backbone"], tokens, positions, segment_ids)
    return hidden.astype(jnp.float32) @ params["head"]["kernel"] + params["head"]["bias"]


def abstract_params(config: ModelConfig):
    """ShapeDtypeStructs of a reward/value model's params (nothing allocated)."""
    from jaxllm.models import param_shapes

    lm = param_shapes(config)
    return jax.eval_shape(lambda: from_lm_params(lm, config, jax.random.key(0)))


def load(directory, mesh=None) -> tuple[ModelConfig, dict]:
    """(config, params) of a reward model trained by `jaxllm rm` (its run directory or checkpoints), checked
    against its recorded digests; with `mesh`, each device reads only its shard (the training layout).
    A checkpoint of a language model is a one-line CheckpointError saying so."""
    from jaxllm import checkpoint as jckpt
    from jaxllm.sharding import tree_shardings

    directory = jckpt.resolve(directory)
    config = jckpt.read_model_config(directory)
    shapes = abstract_params(config)
    if mesh is None:
        shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), shapes)
    else:
        shardings = tree_shardings(logical_axes(config), shapes, mesh)
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    return config, jckpt.restore_params(directory, target, kind="reward", what="a reward model")
