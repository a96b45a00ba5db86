"""The language-model loss: masked next-token cross-entropy plus Baichuan 2's optional max-z term.

A stage's loss has the signature `loss_fn(params, batch, rng) -> (loss, metrics)`: `loss` is a float32
scalar (a mean), `metrics` a dict of float32 scalars. `metrics["weight"]`, when present, is what the mean
is over (here the number of target tokens); the train step combines micro-batches weighted by it, so k
accumulated micro-batches give the loss and gradient of one batch of k.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm.config import ModelConfig
from jaxllm.models import forward, head_logits, output_matrix


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
        mask = batch["loss_mask"].astype(jnp.float32)
        length = mask.shape[1]
        chunk = config.loss_chunk
        if chunk and chunk < length and length % chunk == 0:
            hidden = forward(config, params, batch["tokens"], batch["positions"], batch["segment_ids"], rng=rng,
                             return_hidden=True)
            nll_sum, z_sum = _chunked(config, params, hidden, batch["targets"], mask, chunk, bool(weight))
            z_mean = z_sum / mask.size
        else:
            logits = forward(config, params, batch["tokens"], batch["positions"], batch["segment_ids"], rng=rng)
            nll_sum = jnp.sum(token_nll(logits, batch["targets"]) * mask)
            z_mean = max_z_loss(logits) if weight else None
        count = jnp.sum(mask)
        ce = nll_sum / jnp.maximum(count, 1.0)
        # Micro-batches are combined by their target counts; for the z term (a mean over all positions) that
        # is exact when the counts are equal, as in packed pretraining rows without padding.
        z_term = weight * z_mean if weight else jnp.float32(0.0)
        return ce + z_term, {"loss": ce, "z_loss": z_term, "weight": count}

    return loss_fn


def _chunked(config: ModelConfig, params, hidden, targets, mask, chunk: int, z: bool):
    """(sum of masked NLL, sum of (max logit)²) over `chunk`-token slices of the sequence, one slice's
    float32 logits alive at a time: each slice is rematerialised in the backward pass (one more output
    matmul, ~1 % of a 7B step) instead of keeping [batch, len, vocab] logits and their softmax."""

    # gathered once, outside the loop (inside, XLA re-gathers the FSDP-sharded head for every slice)
    matrix = nn.with_logical_constraint(output_matrix(config, params), (None, "vocab"))

    @jax.checkpoint
    def one(h, t, m):
        logits = head_logits(config, params, h, matrix)
        z_part = jnp.sum(jnp.square(jnp.max(logits, axis=-1))) if z else jnp.float32(0.0)
        return jnp.sum(token_nll(logits, t) * m), z_part

    def body(totals, start):
        piece = [jax.lax.dynamic_slice_in_dim(x, start, chunk, axis=1) for x in (hidden, targets, mask)]
        nll, z_part = one(*piece)
        return (totals[0] + nll, totals[1] + z_part), None

    starts = jnp.arange(0, mask.shape[1], chunk)
    (nll_sum, z_sum), _ = jax.lax.scan(body, (jnp.float32(0.0), jnp.float32(0.0)), starts)
    return nll_sum, z_sum
