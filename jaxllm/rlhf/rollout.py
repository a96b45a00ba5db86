"""Rollouts: sample responses with the jitted generator and lay prompt + response out as training rows."""
from __future__ import annotations

import numpy as np

from jaxllm.inference import SamplingParams, generate


def response_rows(prompts, responses, length: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """Right-padded rows of prompt + response [batch, length]: `tokens` hold the whole sequence (its final
    token included, where a reward model reads it: `last` int32[batch]); targets/positions/segment_ids and
    response_mask float32 (1 where the target is a response token) are the next-token view, whose final
    position has no target. The same layout as `encode_preferences`, so a reward model scores sampled
    replies the way it was trained."""
    batch = len(prompts)
    out = {k: np.zeros((batch, length), np.int32) for k in ("tokens", "targets", "positions", "segment_ids")}
    out["tokens"][:] = pad_id
    out["response_mask"] = np.zeros((batch, length), np.float32)
    out["last"] = np.zeros((batch,), np.int32)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        seq = (list(p) + list(r))[:length]
        n = len(seq)
        out["tokens"][i, :n] = seq
        out["targets"][i, :n - 1] = seq[1:]
        out["positions"][i, :n] = np.arange(n)
        out["segment_ids"][i, :n] = 1
        out["response_mask"][i, max(len(p) - 1, 0):n - 1] = 1
        out["last"][i] = n - 1
    return out


def sample_responses(config, params, prompts, sampling: SamplingParams, rng, stop_ids=(), pad_id=0, mesh=None,
                     vocab_limit=None):
    """(responses as id lists, their sampling log-probs) for a batch of prompt id lists; ids at or past
    `vocab_limit` (padded embedding rows) are never sampled."""
    result = generate(config, params, prompts, sampling, rng, stop_ids=stop_ids, pad_id=pad_id, mesh=mesh,
                      return_logprobs=True, vocab_limit=vocab_limit)
    return result.tokens, result.logprobs
