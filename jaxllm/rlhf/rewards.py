"""Scores of sampled replies: one reward model, or Llama 2's helpfulness + safety pair (§3.2.3, spec §11.2).

A scorer maps rows (see `rollout.response_rows`: tokens, positions, segment_ids, `last`, `safety`, … as
[batch, ...] arrays, global arrays on a mesh) to float32[batch] scores, or to a dict whose "score" is that
and whose other float32[batch] entries are averaged into PPO's metrics.

Where the sigmoid sits. A reward model trained with the ranking loss −log σ(r_chosen − r_rejected) outputs a
raw score r (a logit). Llama 2 compares the safety score with 0.15 as a probability, so the combination reads
the sigmoid scores R_h = σ(r_h), R_s = σ(r_s): R_c = R_s when the prompt is tagged as a safety prompt or
R_s < 0.15, else R_h. PPO then whitens logit(R_c). Since logit(σ(r)) = r, logit(R_c) is taken exactly as the
raw score of the model chosen, not through a float32 sigmoid that rounds to 1 at r ≈ 17.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import ModelConfig
from jaxllm.stages import reward

LLAMA2_SAFETY_THRESHOLD = 0.15  # precision 0.89 / recall 0.55 on Meta Safety (spec §11.2)


def select_reward(help_prob, safety_prob, is_safety, threshold: float = LLAMA2_SAFETY_THRESHOLD):
    """Llama 2's piecewise R_c from sigmoid scores float32[batch]: (R_c, use_safety bool[batch]); the safety
    score wins for tagged prompts and whenever R_s < threshold (strictly: R_s = 0.15 keeps R_h)."""
    use_safety = (jnp.asarray(is_safety) > 0) | (safety_prob < threshold)
    return jnp.where(use_safety, safety_prob, help_prob), use_safety


def combine_llama2(help_raw, safety_raw, is_safety, threshold: float = LLAMA2_SAFETY_THRESHOLD) -> dict:
    """From raw reward-model scores float32[batch]: "score" = logit(R_c) (what PPO whitens), and per row
    R_h, R_s (sigmoid scores) and 1.0 where the safety model's score was used."""
    help_prob, safety_prob = jax.nn.sigmoid(help_raw), jax.nn.sigmoid(safety_raw)
    _, use_safety = select_reward(help_prob, safety_prob, is_safety, threshold)
    return {"score": jnp.where(use_safety, safety_raw, help_raw), "reward_help": help_prob,
            "reward_safety": safety_prob, "safety_used": use_safety.astype(jnp.float32)}


def llama2_scorer(helpfulness: Callable, safety: Callable, threshold: float = LLAMA2_SAFETY_THRESHOLD) -> Callable:
    """A scorer combining a helpfulness and a safety scorer (each rows → raw float32[batch]) as Llama 2 does;
    rows["safety"] is 1 for prompts tagged as safety prompts."""
    combine = jax.jit(functools.partial(combine_llama2, threshold=threshold))

    def scorer(rows):
        return combine(helpfulness(rows), safety(rows), rows["safety"])
    return scorer


def as_scores(out) -> dict:
    """A scorer's output as a dict with "score"."""
    return out if isinstance(out, dict) else {"score": out}


def sharded_scores(rm_config: ModelConfig, params_sh, mesh):
    """jit(reward.scores)(params, tokens, positions, segment_ids, last) → float32[batch], the rows split over
    the mesh's batch axes (what `reward_model_scorer` runs, and what a pre-flight compiles)."""
    from jaxllm import sharding
    rows_sh, last_sh = sharding.batch_sharding(mesh, 2), sharding.batch_sharding(mesh, 1)
    return jax.jit(functools.partial(reward.scores, rm_config),
                   in_shardings=(params_sh, rows_sh, rows_sh, rows_sh, last_sh), out_shardings=last_sh)


def reward_model_scorer(rm_config: ModelConfig, rm_params, mesh=None) -> Callable:
    """scorer(rows) → float32[batch]: the reward model's raw score read at each row's final token (`last`).

    With `mesh`, the reward model's params are laid out on it like training's (FSDP/tensor by the rules
    table) and the rows must split evenly over its batch axes: global arrays (see `rollout.put_rows`) or
    host numpy that is the same on every process."""
    if mesh is None:
        score = jax.jit(functools.partial(reward.scores, rm_config))
        return lambda rows: score(rm_params, rows["tokens"], rows["positions"], rows["segment_ids"], rows["last"])
    from jaxllm import distributed, sharding
    params_sh = sharding.tree_shardings(reward.logical_axes(rm_config), rm_params, mesh)
    rm_params = jax.device_put(rm_params, params_sh)
    rows_sh, last_sh = sharding.batch_sharding(mesh, 2), sharding.batch_sharding(mesh, 1)
    score = sharded_scores(rm_config, params_sh, mesh)

    def scorer(rows):
        args = [rows[k] for k in ("tokens", "positions", "segment_ids", "last")]
        args = [a if isinstance(a, jax.Array) else distributed.put(np.asarray(a), sh)
                for a, sh in zip(args, (rows_sh, rows_sh, rows_sh, last_sh))]
        with jax.set_mesh(mesh), sharding.axis_rules():
            return score(rm_params, *args)
    return scorer
