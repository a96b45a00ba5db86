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


def scores(config: ModelConfig, params: dict, tokens, positions, segment_ids, last) -> jax.Array:
    """Scalar reward per sequence, read at its last token: float32[batch] for tokens [batch, seq],
    last int32[batch]."""
    hidden = forward(backbone_config(config), params["backbone"], tokens, positions, segment_ids)
    final = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0].astype(jnp.float32)
    return final @ params["head"]["kernel"] + params["head"]["bias"]


def token_values(config: ModelConfig, params: dict, tokens, positions=None, segment_ids=None) -> jax.Array:
    """Per-token scalar outputs float32[batch, seq] (a PPO value head over the same backbone)."""
    hidden = forward(backbone_config(config), params["backbone"], tokens, positions, segment_ids)
    return hidden.astype(jnp.float32) @ params["head"]["kernel"] + params["head"]["bias"]
