"""Rollouts: sample responses with the jitted generator and lay prompt + response out as training rows.

On a mesh (one process or several) every process passes the same prompts; each device generates the rows
of the batch it holds, so each host owns its slice of the prompts. The sampled ids are then read back on
every process (a small all-gather) and laid out as rows, which go back onto the mesh as global arrays.
"""
from __future__ import annotations

import functools

import jax
import numpy as np

from jaxllm.inference import SamplingParams, generate


def response_rows(prompts, responses, length: int, pad_id: int = 0, safety=None) -> dict[str, np.ndarray]:
    """Right-padded rows of prompt + response [batch, length]: `tokens` hold the whole sequence (its final
    token included, where a reward model reads it: `last` int32[batch]); targets/positions/segment_ids and
    response_mask float32 (1 where the target is a response token) are the next-token view, whose final
    position has no target; `safety` float32[batch] is 1 for prompts tagged as safety prompts. The same
    layout as `encode_preferences`, so a reward model scores sampled replies the way it was trained."""
    batch = len(prompts)
    out = {k: np.zeros((batch, length), np.int32) for k in ("tokens", "targets", "positions", "segment_ids")}
    out["tokens"][:] = pad_id
    out["response_mask"] = np.zeros((batch, length), np.float32)
    out["last"] = np.zeros((batch,), np.int32)
    out["safety"] = np.zeros((batch,), np.float32) if safety is None else np.asarray(safety, np.float32)
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


def put_rows(rows: dict, mesh) -> dict:
    """Host rows (the same on every process, batch divisible by the mesh's batch axes) → global arrays
    split over the batch axes."""
    from jaxllm import distributed
    from jaxllm.sharding import batch_sharding
    return {k: distributed.put(v, batch_sharding(mesh, np.ndim(v))) for k, v in rows.items()}


def pad_rows(rows: dict, multiple: int) -> tuple[dict, int]:
    """(rows padded with copies of row 0 to a multiple of `multiple`, the real row count)."""
    n = len(rows["tokens"])
    pad = -n % multiple
    if pad:
        rows = {k: np.concatenate([v, np.repeat(v[:1], pad, 0)]) for k, v in rows.items()}
    return rows, n


def score_rows(scorer, rows: dict, mesh=None) -> dict[str, np.ndarray]:
    """Host copies of `scorer`'s outputs for host rows of any count (padded to fit the mesh, then cut)."""
    from jaxllm import distributed
    from jaxllm.inference.generate import batch_shards
    from jaxllm.rlhf.rewards import as_scores

    if mesh is not None:
        rows, n = pad_rows(rows, batch_shards(mesh))
        rows = put_rows(rows, mesh)
    else:
        n = len(rows["tokens"])
    return {k: distributed.to_host(v)[:n].astype(np.float32) for k, v in as_scores(scorer(rows)).items()}


def generation_params(params, axes, mesh, layout: str = "gathered"):
    """The policy's weights laid out for generation on `mesh`: the same arrays ("sharded"), or a copy whole
    on every device of each tensor-parallel group ("gathered"), which the caller drops after generating."""
    if layout == "sharded" or mesh is None:
        return params
    leaves, tree = jax.tree.flatten(generation_shardings(axes, params, mesh, layout))
    return relayout(tree, tuple(leaves))(params)


def generation_shardings(axes, shapes, mesh, layout: str = "gathered"):
    """The shardings `generation_params` lays the policy out on: training's ("sharded"), or the rules
    table without FSDP ("gathered": whole on every device of each tensor-parallel group)."""
    from jaxllm import sharding
    rules = sharding.LOGICAL_RULES
    if layout == "gathered":
        rules = tuple((name, None if name == "embed" else axes_) for name, axes_ in rules)
    return sharding.tree_shardings(axes, shapes, mesh, rules)


@functools.lru_cache(maxsize=8)
def relayout(tree, shardings):
    """A jitted copy onto `shardings` (flattened with `tree`), compiled once per layout."""
    return jax.jit(lambda p: p, out_shardings=jax.tree.unflatten(tree, shardings))


def sample_responses(config, params, prompts, sampling: SamplingParams, rng, stop_ids=(), pad_id=0, mesh=None,
                     vocab_limit=None):
    """(responses as id lists, their sampling log-probs) for a batch of prompt id lists; ids at or past
    `vocab_limit` (padded embedding rows) are never sampled. On several processes every one gets every
    response."""
    result = generate(config, params, prompts, sampling, rng, stop_ids=stop_ids, pad_id=pad_id, mesh=mesh,
                      return_logprobs=True, vocab_limit=vocab_limit)
    return result.tokens, result.logprobs
