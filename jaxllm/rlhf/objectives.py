"""PPO pieces as pure functions over [batch, seq] arrays of the response tokens (mask 1 on them).

reward_t = -β·KL_t at every response token, plus the reward-model score at the last one, with
KL_t = log π(a_t) - log π_ref(a_t) (the sampled-token estimator). Advantages come from GAE over
the value head, then are whitened; the policy loss is PPO's clipped surrogate.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def masked_mean(x, mask, axis=None):
    return jnp.sum(x * mask, axis=axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1.0)


def whiten(x, mask, shift_mean: bool = True):
    """(x - mean) / std over the masked entries; with shift_mean=False the mean is added back."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * jax.lax.rsqrt(var + 1e-8)
    return (out if shift_mean else out + mean) * mask


def whiten_scores(scores):
    """Sequence scores float32[batch] whitened over the batch (Llama 2 whitens logit(R_c) so)."""
    return whiten(scores, jnp.ones_like(scores))


def kl_penalised_rewards(scores, logprobs, ref_logprobs, mask, beta: float):
    """Per-token rewards float32[batch, seq]: -β·KL everywhere on the response, + score at its last token.

    scores float32[batch]; logprobs, ref_logprobs, mask float32[batch, seq].
    """
    kl = (logprobs - ref_logprobs) * mask
    last = jnp.argmax(jnp.cumsum(mask, axis=1), axis=1)  # index of the last response token
    bonus = jax.nn.one_hot(last, mask.shape[1]) * scores[:, None]
    return -beta * kl + bonus * mask, kl


def gae(rewards, values, mask, gamma: float = 1.0, lam: float = 0.95):
    """Generalised advantage estimation, right to left: (advantages, returns) float32[batch, seq].

    Values past the response (mask 0) count as 0, so the last response token bootstraps from nothing.
    """
    values = values * mask

    def step(carry, inputs):
        next_value, next_adv = carry
        r, v, m = inputs
        delta = r + gamma * next_value - v
        adv = (delta + gamma * lam * next_adv) * m
        return (v, adv), adv

    init = (jnp.zeros(rewards.shape[0]), jnp.zeros(rewards.shape[0]))
    _, adv = jax.lax.scan(step, init, (rewards.T, values.T, mask.T), reverse=True)
    advantages = adv.T
    return advantages, (advantages + values) * mask


def policy_loss(logprobs, old_logprobs, advantages, mask, clip: float = 0.2):
    """PPO clipped surrogate (masked token mean) and metrics: clip fraction, approximate KL."""
    ratio = jnp.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(jnp.maximum(unclipped, clipped), mask)
    metrics = {"clip_fraction": masked_mean((jnp.abs(ratio - 1.0) > clip).astype(jnp.float32), mask),
               "approx_kl": masked_mean(0.5 * (logprobs - old_logprobs) ** 2, mask)}
    return loss, metrics


def value_loss(values, old_values, returns, mask, clip: float = 0.2):
    """Clipped value loss 0.5·max((V - R)², (V_clip - R)²), masked token mean."""
    clipped = old_values + jnp.clip(values - old_values, -clip, clip)
    loss = 0.5 * jnp.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    return masked_mean(loss, mask)
