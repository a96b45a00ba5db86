"""Rollouts: sample responses with the jitted generator and lay prompt + response out as training rows."""
from __future__ import annotations

import numpy as np

from jaxllm.inference import SamplingParams, generate


def response_rows(prompts, responses, length: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """Right-padded next-token rows of prompt + response: tokens/targets/positions/segment_ids int32 and
    response_mask float32 [batch, length] (1 where the target is a response token), `last` int32[batch]
    (the last input position, whose output reads the whole sequence)."""
    batch = len(prompts)
    out = {k: np.zeros((batch, length), np.int32) for k in ("tokens", "targets", "positions", "segment_ids")}
    out["tokens"][:] = pad_id
    out["response_mask"] = np.zeros((batch, length), np.float32)
    out["last"] = np.zeros((batch,), np.int32)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        seq = list(p) + list(r)
        n = min(len(seq) - 1, length)
        out["tokens"][i, :n] = seq[:n]
        out["targets"][i, :n] = seq[1:n + 1]
        out["positions"][i, :n] = np.arange(n)
        out["segment_ids"][i, :n] = 1
        out["response_mask"][i, max(len(p) - 1, 0):n] = 1
        out["last"][i] = n - 1
    return out


def sample_responses(config, params, prompts, sampling: SamplingParams, rng, stop_ids=(), pad_id=0, mesh=None):
    """(responses as id lists, their sampling log-probs) for a batch of prompt id lists."""
    result = generate(config, params, prompts, sampling, rng, stop_ids=stop_ids, pad_id=pad_id, mesh=mesh,
                      return_logprobs=True)
    return result.tokens, result.logprobs
