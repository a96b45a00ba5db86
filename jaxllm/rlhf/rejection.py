"""Rejection-sampling fine-tuning data (Llama 2 §3.2.3): K samples per prompt, keep the best by reward."""
from __future__ import annotations

from typing import Callable

import numpy as np

from jaxllm.inference import SamplingParams
from jaxllm.rlhf.rollout import response_rows, sample_responses


def best_of_k(model_config, params, prompts, scorer, k: int, sampling: SamplingParams, rng, *, stop_ids=(),
              pad_id: int = 0, batch_size: int = 32, accept: Callable[[list[int]], bool] | None = None, mesh=None,
              vocab_limit: int | None = None):
    """For each prompt: (best response ids, its score, all K scores). Samples are drawn K at a time per
    prompt (the prompt repeated K times in one batch), scored with `scorer(rows)`.

    `accept(ids)`: only samples it accepts can be kept (e.g. no blank reply); a prompt none of whose K
    samples is accepted gets (None, nan, scores). `mesh`: as in `generate` (params sharded on it)."""
    import jax

    results = []
    per_batch = max(1, batch_size // k)
    length = max(len(p) for p in prompts) + sampling.max_new_tokens
    for start in range(0, len(prompts), per_batch):
        chunk = prompts[start:start + per_batch]
        repeated = [p for p in chunk for _ in range(k)]
        rng, key = jax.random.split(rng)
        responses, _ = sample_responses(model_config, params, repeated, sampling, key, stop_ids, pad_id, mesh=mesh,
                                        vocab_limit=vocab_limit)
        scores = np.asarray(scorer(response_rows(repeated, responses, length, pad_id)), np.float32)
        for i in range(len(chunk)):
            block = scores[i * k:(i + 1) * k]
            ok = [accept is None or accept(responses[i * k + j]) for j in range(k)]
            if not any(ok):
                results.append((None, float("nan"), block.tolist()))
                continue
            best = max((j for j in range(k) if ok[j]), key=lambda j: block[j])
            results.append((responses[i * k + best], float(block[best]), block.tolist()))
    return results


def reward_vs_k(all_scores: list[list[float]]) -> list[dict]:
    """Mean over prompts of the max and the median reward among the first k samples, for k = 1..K."""
    scores = np.asarray(all_scores)
    return [{"k": k, "max": float(scores[:, :k].max(1).mean()), "median": float(np.median(scores[:, :k], 1).mean())}
            for k in range(1, scores.shape[1] + 1)]
