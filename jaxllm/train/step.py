"""The train step: accumulate gradients over micro-batches, clip, update — or skip a non-finite step."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxllm.train.split import merge


def _weighted_grads(loss_fn, params, batch, rng, frozen=None):
    """(objective, metrics, grads) of one micro-batch, each multiplied by its weight, and that weight. The
    loss sees `frozen` merged into `params`; only `params` get gradients."""
    objective_fn = loss_fn if frozen is None else (lambda p, b, r: loss_fn(merge(p, frozen), b, r))
    (objective, metrics), grads = jax.value_and_grad(objective_fn, has_aux=True)(params, batch, rng)
    metrics = dict(metrics)
    weight = jnp.asarray(metrics.pop("weight", 1.0), jnp.float32)
    metrics["objective"] = objective
    scale = lambda x: x * weight.astype(x.dtype)
    return jax.tree.map(scale, metrics), jax.tree.map(scale, grads), weight


def _schedule_count(opt_state, default):
    """The count the optimizer's schedule used for this update: skipped steps do not advance it, so after
    a skip it lags the loop's step number."""
    count = optax.tree_utils.tree_get(
        opt_state, "count", filtering=lambda path, _: path[-1].tuple_name == "ScaleByScheduleState")
    return default if count is None else count


def make_train_step(loss_fn, optimizer: optax.GradientTransformation, schedule=None):
    """step(params, opt_state, batch, rng, step[, frozen]) → (params, opt_state, metrics).

    frozen: parameters the loss sees next to `params` (nested dicts merged, `jaxllm.train.split`: e.g. a
    frozen base under adapters) that get no gradient, optimizer state or update.

    batch: pytree of [accum, micro_batch, ...] arrays; the accum micro-batches run in a `scan` and their
    gradients are averaged with the loss's `weight`s. When the objective or the gradient norm is NaN/Inf the
    update is skipped (params and optimizer state are returned unchanged) and `metrics['skipped']` is 1.
    metrics: the loss's own (weighted means), objective, grad_norm (before clipping), lr, skipped.
    """

    def step(params, opt_state, batch, rng, step_number, frozen=None):
        accum = jax.tree.leaves(batch)[0].shape[0]
        if accum == 1:
            sums, grads, total = _weighted_grads(loss_fn, params, jax.tree.map(lambda x: x[0], batch),
                                                 jax.random.fold_in(rng, 0), frozen)
        else:  # one traced copy of the model, whatever accum is
            def micro(carry, xs):
                index, micro_batch = xs
                m, g, w = _weighted_grads(loss_fn, params, micro_batch, jax.random.fold_in(rng, index), frozen)
                return jax.tree.map(jnp.add, carry, (m, g, w)), None

            shapes = jax.eval_shape(lambda: _weighted_grads(loss_fn, params, jax.tree.map(lambda x: x[0], batch),
                                                            rng, frozen))
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
            (sums, grads, total), _ = jax.lax.scan(micro, zeros, (jnp.arange(accum), batch))
        denominator = jnp.maximum(total, 1e-9)
        metrics = jax.tree.map(lambda x: x / denominator, sums)
        grads = jax.tree.map(lambda g: g / denominator.astype(g.dtype), grads)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(metrics["objective"]) & jnp.isfinite(grad_norm)

        if schedule is not None:  # from the optimizer's count before the update: the rate it applies
            metrics["lr"] = jnp.asarray(schedule(_schedule_count(opt_state, step_number)), jnp.float32)
        updates, new_opt_state = optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jnp.where(finite, new, old)
        params = jax.tree.map(keep, new_params, params)
        opt_state = jax.tree.map(keep, new_opt_state, opt_state)

        metrics.setdefault("loss", metrics["objective"])
        metrics.update(grad_norm=grad_norm, skipped=(~finite).astype(jnp.int32))
        return params, opt_state, metrics

    return step
