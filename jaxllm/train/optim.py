"""AdamW + global-norm clipping + warmup/decay schedule (optax), with weight decay off on norm scales."""
from __future__ import annotations

import math

import jax
import optax
from jax.sharding import PartitionSpec

from jaxllm.train.config import OptimizerConfig


def make_schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then cosine (or linear) decay to `min_lr_ratio·lr` at `decay_steps`
    (default `total_steps`), flat afterwards; or a constant `lr` after the warmup. The warmup is
    `warmup_steps`, or `warmup_fraction` of `decay_steps` when that is longer."""
    decay = config.decay_steps or total_steps
    peak, end = config.lr, config.lr * config.min_lr_ratio
    warmup = config.warmup_steps
    if config.warmup_fraction:
        warmup = max(warmup, math.ceil(config.warmup_fraction * decay))
    if config.schedule == "constant":
        if not warmup:
            return optax.constant_schedule(peak)
        return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)],
                                    [warmup])
    if config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(decay, warmup + 1), end)
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup),
                                 optax.linear_schedule(peak, end, max(decay - warmup, 1))], [warmup])


def decay_mask(param_axes):
    """True for every parameter that gets weight decay: all but norm scales (logical axis 'norm')."""
    return jax.tree.map(lambda spec: "norm" not in tuple(spec), param_axes,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def make_optimizer(config: OptimizerConfig, total_steps: int, param_axes):
    """(optax transformation, schedule). `param_axes`: pytree of logical PartitionSpecs like the params."""
    schedule = make_schedule(config, total_steps)
    adamw = optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                        weight_decay=config.weight_decay, mask=decay_mask(param_axes))
    if config.clip_norm:
        return optax.chain(optax.clip_by_global_norm(config.clip_norm), adamw), schedule
    return adamw, schedule
