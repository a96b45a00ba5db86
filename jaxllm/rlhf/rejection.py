"""Rejection-sampling fine-tuning data (Llama 2 §3.2.3): K samples per prompt, keep the best by reward.

Across iterations Llama 2 keeps the best sample per prompt over every earlier iteration's pool, not only the
latest policy's (RLHF-V3 regressed without it): `keep_best` compares this iteration's best with the pooled
replies, re-scored by the current reward model. On several processes every process samples its slice of
each batch and gets every result, so all hold the same results in prompt order.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from jaxllm.inference import SamplingParams
from jaxllm.rlhf.rollout import response_rows, sample_responses, score_rows


def best_of_k(model_config, params, prompts, scorer, k: int, sampling: SamplingParams, rng, *, stop_ids=(),
              pad_id: int = 0, batch_size: int = 32, render: Callable | None = None, mesh=None,
              vocab_limit: int | None = None, safety=None, shards=None):
    """For each prompt: (best response ids, its score, all K scores). Samples are drawn K at a time per
    prompt (the prompt repeated K times in one batch), scored with `scorer(rows)` (see `rewards`; rows carry
    `safety`, one bool per prompt, for Llama 2's combined score).

    `render(i, ids)`: what is scored for sample `ids` of prompt i, as (prompt ids, reply ids), e.g. the
    conversation the chat template renders from the reply's text, which SFT will train on; None when the
    sample cannot be kept (e.g. a blank reply). Without it the prompt and the sampled ids are scored. A
    prompt none of whose K samples can be kept gets (None, nan, scores). `mesh`: as in `generate` (params
    sharded on it).

    The prompts go in units of `batch_size // k`; unit u (prompts from u·(batch_size // k)) samples with
    the u-th key of the chain `rng, key = split(rng)`, a function of the seed and u alone: its samples
    depend on where its prompts are, never on which units ran in this process. `shards` (`jaxllm.train.engine.Shards`, `unit_count` units): finished units
    are read back, the others sampled and committed one by one, so a killed run resumes where it stopped
    and writes what an uninterrupted one would."""
    import jax

    results = []
    per_batch = max(1, batch_size // k)
    for unit, start in enumerate(range(0, len(prompts), per_batch)):
        rng, key = jax.random.split(rng)  # unit u's key: a function of the seed and u alone
        if shards is not None and shards.done(unit):
            results += [(ids, float(score), scores) for ids, score, scores in shards.load(unit)]
            continue
        chunk = range(start, min(start + per_batch, len(prompts)))
        done = _best_of_chunk(model_config, params, prompts, chunk, scorer, k, sampling, key, stop_ids, pad_id,
                              render, mesh, vocab_limit, safety)
        if shards is not None:
            shards.commit(unit, done)
        results += done
    return results


def unit_count(num_prompts: int, k: int, batch_size: int) -> int:
    """How many units `best_of_k` splits `num_prompts` prompts into."""
    per_batch = max(1, batch_size // k)
    return -(-num_prompts // per_batch)


def _best_of_chunk(model_config, params, prompts, chunk, scorer, k, sampling, key, stop_ids, pad_id, render, mesh,
                   vocab_limit, safety):
    repeated = [prompts[i] for i in chunk for _ in range(k)]
    tags = None if safety is None else [safety[i] for i in chunk for _ in range(k)]
    responses, _ = sample_responses(model_config, params, repeated, sampling, key, stop_ids, pad_id, mesh=mesh,
                                    vocab_limit=vocab_limit)
    owners = [i for i in chunk for _ in range(k)]
    rendered = [(p, r) if render is None else render(i, r) for i, p, r in zip(owners, repeated, responses)]
    pairs = [pair or (p, r) for pair, p, r in zip(rendered, repeated, responses)]  # refused: scored as sampled
    scores = score_replies(scorer, [p for p, _ in pairs], [r for _, r in pairs], pad_id=pad_id, safety=tags,
                           batch_size=len(pairs), mesh=mesh)
    results = []
    for n in range(len(chunk)):
        block = scores[n * k:(n + 1) * k]
        ok = [rendered[n * k + j] is not None for j in range(k)]
        if not any(ok):
            results.append((None, float("nan"), block.tolist()))
            continue
        best = max((j for j in range(k) if ok[j]), key=lambda j: block[j])
        results.append(([int(t) for t in responses[n * k + best]], float(block[best]), block.tolist()))
    return results


@dataclasses.dataclass(frozen=True)
class Kept:
    """The reply kept for one prompt: this iteration's sample (`pooled` None, `ids` its tokens) or a pooled
    reply of an earlier iteration (`pooled` its index in the pool); `score` under the current reward."""
    score: float
    ids: list[int] | None = None
    pooled: int | None = None


def keep_best(results, pool_of_prompt: list[list[int]], pool_scores) -> list[Kept | None]:
    """Per prompt, the best of this iteration's kept sample (`best_of_k` results) and its pooled replies.

    pool_of_prompt[i]: indices into `pool_scores` of prompt i's pooled replies; a tie keeps the new sample.
    None where a prompt has neither a usable sample nor a pooled reply."""
    kept = []
    for (ids, score, _), pooled in zip(results, pool_of_prompt, strict=True):
        best = None if ids is None else Kept(float(score), ids=ids)
        for j in pooled:
            if best is None or pool_scores[j] > best.score:
                best = Kept(float(pool_scores[j]), pooled=j)
        kept.append(best)
    return kept


def score_replies(scorer, prompt_ids, reply_ids, *, pad_id: int = 0, safety=None, batch_size: int = 32,
                  mesh=None) -> np.ndarray:
    """float32 scores of given (prompt ids, reply ids) pairs, e.g. pooled replies, in batches (rows padded to
    a power-of-two length, so batches share compiled programs)."""
    from jaxllm.inference.generate import bucket

    out = []
    for start in range(0, len(prompt_ids), batch_size):
        prompts, replies = prompt_ids[start:start + batch_size], reply_ids[start:start + batch_size]
        length = bucket(max(len(p) + len(r) for p, r in zip(prompts, replies)))
        tags = None if safety is None else safety[start:start + batch_size]
        out.append(score_rows(scorer, response_rows(prompts, replies, length, pad_id, tags), mesh)["score"])
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


def reward_vs_k(all_scores: list[list[float]]) -> list[dict]:
    """Mean over prompts of the max and the median reward among the first k samples, for k = 1..K."""
    scores = np.asarray(all_scores)
    return [{"k": k, "max": float(scores[:, :k].max(1).mean()), "median": float(np.median(scores[:, :k], 1).mean())}
            for k in range(1, scores.shape[1] + 1)]
