"""The language-model loss: masked next-token cross-entropy plus Baichuan 2's optional max-z term.

A stage's loss has the signature `loss_fn(params, batch, rng) -> (loss, metrics)`: `loss` is a float32
scalar (a mean), `metrics` a dict of float32 scalars. `metrics["weight"]`, when present, is what the mean
is over (here the number of target tokens); the train step combines micro-batches weighted by it, so k
accumulated micro-batches give the loss and gradient of one batch of k.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm.config import ModelConfig
from jaxllm.models import forward


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """-log p(target): float32[batch, seq] from logits float32[batch, seq, vocab], targets int32[batch, seq]."""
    logits = logits.astype(jnp.float32)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - target_logit


def max_z_loss(logits: jax.Array) -> jax.Array:
    """mean over every position of (max_v logit)²: Baichuan 2's max-z loss before its weight (spec §6.3).

    Like Baichuan 2's code, unlabelled positions (prompt, padding, document boundaries) count too.
    logits float32[batch, seq, vocab].
    """
    z = jnp.max(logits.astype(jnp.float32), axis=-1)
    return jnp.mean(z * z)


def lm_loss(config: ModelConfig, z_loss_weight: float | None = None):
    """loss_fn(params, batch, rng) for next-token prediction on packed rows.

    batch: tokens, targets, segment_ids, positions int32[batch, seq]; loss_mask float32[batch, seq].
    loss = mean over loss_mask of CE + z_loss_weight · mean over all positions of (max logit)² (weight
    default: `config.z_loss_weight`).
    metrics: loss (the CE), z_loss (the weighted term), weight (target tokens).
    """
    weight = config.z_loss_weight if z_loss_weight is None else z_loss_weight

    def loss_fn(params, batch, rng):
        logits = forward(config, params, batch["tokens"], batch["positions"], batch["segment_ids"], rng=rng)
        mask = batch["loss_mask"].astype(jnp.float32)
        count = jnp.sum(mask)
        ce = jnp.sum(token_nll(logits, batch["targets"]) * mask) / jnp.maximum(count, 1.0)
        # Micro-batches are combined by their target counts; for the z term (a mean over all positions) that
        # is exact when the counts are equal, as in packed pretraining rows without padding.
        z_term = weight * max_z_loss(logits) if weight else jnp.float32(0.0)
        return ce + z_term, {"loss": ce, "z_loss": z_term, "weight": count}

    return loss_fn
