"""Easy-to-hard SFT curriculum (Ziya-LLaMA-13B, spec §11.4): conversations ranked by a model's loss on
their replies and split into successive stages, each trained as its own `jaxllm sft` run that starts from
the previous one (`init_from`).

Difficulty is the model's mean negative log-likelihood per trained (reply) token: what it already predicts
well is easy.
"""
from __future__ import annotations

import numpy as np

from jaxllm.stages.data import pack_examples


def example_rows(examples, seq_len: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """One example per row (no packing), rows [n, seq_len]; each example must fit (≤ seq_len + 1 ids)."""
    parts = [pack_examples([example], seq_len, pad_id) for example in examples]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def difficulty(model_config, params, examples, seq_len: int, mesh, pad_id: int = 0,
               batch: int = 16) -> np.ndarray:
    """float32[n]: the model's mean NLL per trained token of each example [(ids, mask, labels)]."""
    from jaxllm.stages.stages import sequence_scores

    out = np.zeros(len(examples), np.float32)
    step = 1024  # examples rendered as rows at a time, so memory stays one block of rows
    for start in range(0, len(examples), step):
        rows = example_rows(examples[start:start + step], seq_len, pad_id)
        logps = sequence_scores(model_config, params, rows, mesh, batch=batch)
        out[start:start + step] = -logps / rows["loss_mask"].sum(axis=1)
    return out


def split_stages(scores: np.ndarray, stages: int) -> list[np.ndarray]:
    """Indices of the examples in each stage, easiest first: the examples sorted by score (ties in input
    order) and cut into `stages` parts whose sizes differ by at most one."""
    if stages < 1:
        raise ValueError(f"stages must be >= 1, got {stages}")
    if len(scores) < stages:
        raise ValueError(f"{len(scores)} examples cannot fill {stages} stages")
    order = np.argsort(scores, kind="stable")
    return [np.sort(part) for part in np.array_split(order, stages)]
