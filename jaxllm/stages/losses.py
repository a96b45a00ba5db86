"""Losses of the alignment stages: sequence log-probs, DPO (Rafailov et al.), Llama 2's margin ranking loss."""
from __future__ import annotations

import jax
import jax.numpy as jnp

# Llama 2 Table 27 margins m(r) by preference rating (spec §3.3). "large" is confirmed by two sources;
# "small" is marked UNVERIFIED in the spec.
LLAMA2_MARGINS = {
    "large": {"significantly better": 3.0, "better": 2.0, "slightly better": 1.0,
              "negligibly better": 0.0, "unsure": 0.0},
    "small": {"significantly better": 1.0, "better": 2.0 / 3.0, "slightly better": 1.0 / 3.0,
              "negligibly better": 0.0, "unsure": 0.0},
}


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(targets): float32[batch, seq] from logits float32[batch, seq, vocab]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def sequence_logprobs(logits, targets, loss_mask) -> jax.Array:
    """Sum of log p over the masked (response) tokens: float32[batch]."""
    return jnp.sum(token_logprobs(logits, targets) * loss_mask, axis=-1)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float,
             label_smoothing: float = 0.0):
    """DPO: -log σ(β[(π_c - ref_c) - (π_r - ref_r)]), mean over pairs; inputs float32[batch] log-probs.

    With label smoothing ε (conservative DPO) the loss is (1-ε)·that + ε·(-log σ(-z)).
    Returns (loss, metrics) with implicit rewards β(π - ref), their accuracy and margin.
    """
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    z = chosen_reward - rejected_reward
    loss = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(z) - label_smoothing * jax.nn.log_sigmoid(-z)
    metrics = {
        "reward_accuracy": jnp.mean((chosen_reward > rejected_reward).astype(jnp.float32)),
        "reward_margin": jnp.mean(z),
        "chosen_reward": jnp.mean(chosen_reward),
        "rejected_reward": jnp.mean(rejected_reward),
    }
    return jnp.mean(loss), metrics


def ranking_loss(reward_chosen, reward_rejected, margin=0.0):
    """Llama 2 reward-model loss -log σ(r_c - r_r - m(r)), mean over pairs; inputs float32[batch]."""
    diff = reward_chosen - reward_rejected
    loss = -jax.nn.log_sigmoid(diff - margin)
    metrics = {"accuracy": jnp.mean((diff > 0).astype(jnp.float32)), "reward_margin": jnp.mean(diff),
               "chosen_reward": jnp.mean(reward_chosen), "rejected_reward": jnp.mean(reward_rejected)}
    return jnp.mean(loss), metrics
