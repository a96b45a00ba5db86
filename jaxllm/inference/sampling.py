"""Sampling: vocabulary limit, repetition penalty, temperature, top-k, top-p (HF semantics), greedy at
temperature 0."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxllm.models.presets import GENERATION_DEFAULTS


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 is greedy; top_k 0 and top_p 1 disable those filters."""
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    max_new_tokens: int = 256

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


FAMILY_DEFAULTS = {family: SamplingParams(**fields) for family, fields in GENERATION_DEFAULTS.items()}


def mask_vocab(logits, vocab_limit: int | None):
    """-inf for ids >= vocab_limit: padded embedding rows (CT-LLM 125,824 rows for 125,696 pieces) that no
    tokenizer piece stands for."""
    if vocab_limit is None or vocab_limit >= logits.shape[-1]:
        return logits
    return jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, -jnp.inf)


def apply_repetition_penalty(logits, seen, penalty: float):
    """HF: for tokens already in prompt or output, divide positive logits by the penalty and multiply
    negative ones. logits float32[batch, vocab], seen bool[batch, vocab]."""
    if penalty == 1.0:
        return logits
    penalised = jnp.where(logits > 0, logits / penalty, logits * penalty)
    return jnp.where(seen, penalised, logits)


def filter_top_k(logits, k: int):
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    threshold = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < threshold, -jnp.inf, logits)


def filter_top_p(logits, p: float):
    """Keep the smallest set of most likely tokens whose probability reaches p (always at least one)."""
    if p >= 1.0:
        return logits
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
    keep_sorted = before < p
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    return jnp.where(keep, logits, -jnp.inf)


def sample(logits, rng, params: SamplingParams, seen=None, vocab_limit: int | None = None):
    """Next token int32[batch] from logits float32[batch, vocab]; never an id >= `vocab_limit`."""
    logits = mask_vocab(logits, vocab_limit)
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_top_p(filter_top_k(logits / params.temperature, params.top_k), params.top_p)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _largest_threshold(values, holds, lo, hi, iterations: int = 40):
    """Per row, the largest t in [lo, hi] (float32[batch] each) with holds(t) (holds(lo) must be true and
    holds must only turn false as t grows), by bisection: no sort of the vocabulary, which on CPU costs
    ~100 ms for [4, 32000] against ~1 ms for these passes. Values closer than (hi - lo) / 2^40 count as tied."""
    def halve(_, bounds):
        lo, hi = bounds
        mid = (lo + hi) / 2
        ok = holds(mid)
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    return jax.lax.fori_loop(0, iterations, halve, (lo, hi))[0]


def filter_rows(logits, top_k, top_p):
    """top-k then top-p (HF order) with a k and p per row: logits float32[batch, vocab], top_k int32[batch]
    (0: off), top_p float32[batch] (1: off). Like `filter_top_k`, ties at the cut are all kept."""
    finite = jnp.isfinite(logits)
    high = jnp.max(logits, axis=-1)
    low = jnp.min(jnp.where(finite, logits, high[:, None]), axis=-1)
    k = jnp.where(top_k > 0, top_k, logits.shape[-1])[:, None]
    count_at_least = lambda t: jnp.sum(logits >= t[:, None], axis=-1) >= k[:, 0]
    kth = _largest_threshold(logits, count_at_least, low, high)
    logits = jnp.where((logits >= kth[:, None]) | (top_k[:, None] <= 0), logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    mass_at_least = lambda t: jnp.sum(jnp.where(probs >= t[:, None], probs, 0.0), axis=-1) >= top_p
    cut = _largest_threshold(probs, mass_at_least, jnp.zeros_like(top_p), jnp.max(probs, axis=-1))
    return jnp.where((probs >= cut[:, None]) | (top_p[:, None] >= 1.0), logits, -jnp.inf)


def _draw(key, logits):
    """One id from softmax(logits) by inverting the CDF with one uniform number: the same distribution as
    `jax.random.categorical`, which draws a Gumbel number per vocabulary entry (the bulk of a sampled
    decode step on CPU)."""
    cdf = jnp.cumsum(jax.nn.softmax(logits))
    r = jax.random.uniform(key, dtype=cdf.dtype) * cdf[-1]
    return jnp.minimum(jnp.sum(cdf <= r), logits.shape[-1] - 1).astype(jnp.int32)


def sample_rows(logits, keys, temperature, top_k, top_p, penalty, seen, vocab_limit: int | None = None):
    """Next token int32[batch] with sampling settings per row, as a server batches different requests:
    keys: one PRNG key per row; temperature float32[batch] (0: greedy), top_k int32[batch], top_p
    float32[batch], penalty float32[batch] (repetition penalty, 1: off) against seen bool[batch, vocab].
    Each row depends only on its own logits, settings and key, never on the other rows. The sort behind
    top-k/p and the penalty run only when some row asks for them."""
    logits = mask_vocab(logits, vocab_limit)
    logits = jax.lax.cond(jnp.any(penalty != 1.0), lambda x: jnp.where(
        seen, jnp.where(x > 0, x / penalty[:, None], x * penalty[:, None]), x), lambda x: x, logits)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    hot = temperature > 0

    def draw(x):
        x = x / jnp.where(hot, temperature, 1.0)[:, None]
        wants_filter = jnp.any(hot & ((top_k > 0) | (top_p < 1.0)))
        x = jax.lax.cond(wants_filter, lambda y: filter_rows(y, top_k, top_p), lambda y: y, x)
        return jax.vmap(_draw)(keys, x)

    drawn = jax.lax.cond(jnp.any(hot), draw, lambda x: greedy, logits)
    return jnp.where(hot, drawn, greedy)
