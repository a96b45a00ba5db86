"""PPO with a KL penalty against the frozen starting policy (Llama 2 §3.2.3, Ziya's RLHF).

One iteration: sample responses for a batch of prompts (jitted KV-cached sampler) → score them (reward
model, Llama 2's helpfulness/safety pair, or any `scorer(rows)`, see `rewards`) → per-token rewards −β·KL
plus the whitened score at the last token → GAE over the value head → whitened advantages → `epochs` passes
of clipped-surrogate + clipped value loss over minibatches, AdamW with a constant learning rate and
gradient clipping.

Everything after sampling is a global array on the mesh: rows, scores, log-probs, values, advantages and
each minibatch (gathered on the devices from the rollout by index), so the same code runs on one device, on
many, and on several processes (`jax.distributed`), where each host generates and holds its slice of the
rows and checkpoints are written by all of them together.
"""
from __future__ import annotations

import contextlib
import functools
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxllm import distributed
from jaxllm.config import ModelConfig
from jaxllm.inference import SamplingParams
from jaxllm.models import forward
from jaxllm.rlhf.objectives import gae, kl_penalised_rewards, policy_loss, value_loss, whiten, whiten_scores
from jaxllm.rlhf.rewards import as_scores, reward_model_scorer  # noqa: F401  (reward_model_scorer: re-export)
from jaxllm.rlhf.config import PPOConfig
from jaxllm.train.config import parse_window
from jaxllm.rlhf.parts import WholePolicy
from jaxllm.rlhf.rollout import put_rows, response_rows, sample_responses
from jaxllm.stages import reward
from jaxllm.stages.losses import token_logprobs
from jaxllm.train.engine import Run, mesh_context


def _optimizer(cfg: PPOConfig, axes):
    """Training's AdamW (weight decay off on norm scales, global-norm clipping) at a constant rate."""
    from jaxllm.train.config import OptimizerConfig
    from jaxllm.train.optim import make_optimizer

    optimizer, _ = make_optimizer(OptimizerConfig(lr=cfg.lr, schedule="constant", warmup_steps=0, b1=cfg.b1,
                                                  b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                                                  clip_norm=cfg.clip_norm), 1, axes)
    return optimizer


class Layout:
    """Shardings of a PPO run on `mesh`: policy and reference like training's params, the value model like
    a reward model's, optimizer moments like their params, rollout rows over the batch axes."""

    def __init__(self, parts, mesh, cfg: PPOConfig, policy, value):
        from jax.sharding import NamedSharding, PartitionSpec as P

        from jaxllm import sharding

        self.mesh, self.parts = mesh, parts
        self.check_batch(cfg, mesh)
        self.axes = parts.axes()  # of what trains: (policy, value model)
        self.shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (policy, value))
        self.params = tuple(sharding.tree_shardings(a, s, mesh) for a, s in zip(self.axes, self.shapes))
        self.frozen = self.params[0] if parts.frozen_sh is None else parts.frozen_sh  # what it only reads
        self.optimizer = _optimizer(cfg, self.axes)
        self.replicated = NamedSharding(mesh, P())
        self.opt_shapes = jax.eval_shape(self.optimizer.init, self.abstract(self.shapes, self.params))
        self.opt = optax.tree_map_params(self.optimizer, lambda _, sh: sh, self.opt_shapes, self.params,
                                         transform_non_params=lambda _: self.replicated)
        self.rows = sharding.batch_sharding(mesh, ndim=2)
        self.per_row = sharding.batch_sharding(mesh, ndim=1)

    @staticmethod
    def check_batch(cfg: PPOConfig, mesh) -> None:
        """Rollout rows and minibatches split evenly over the mesh's batch axes (data × fsdp)."""
        from jaxllm.config import ConfigError

        shards = int(np.prod([mesh.shape[a] for a in ("data", "fsdp")]))
        for name in ("batch_size", "minibatch_size"):
            if getattr(cfg, name) % shards:
                raise ConfigError(f"ppo.{name}={getattr(cfg, name)} rows are not divisible by mesh "
                                  f"data×fsdp={shards}")
        if cfg.batch_size // cfg.generation_chunks % shards:
            raise ConfigError(f"ppo.batch_size/ppo.generation_chunks={cfg.batch_size // cfg.generation_chunks} "
                              f"rows are not divisible by mesh data×fsdp={shards}")

    @staticmethod
    def abstract(shapes, shardings):
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)

    def context(self):
        return mesh_context(self.mesh)


# Jitted functions per (model, mesh, parameter shapes[, the settings they read]): a resumed or repeated run
# in the same process reuses their compilations.
_COMPILED: dict = {}
_UPDATE_FIELDS = ("lr", "b1", "b2", "eps", "weight_decay", "clip_norm", "clip", "value_clip", "value_coef")
_ADVANTAGE_FIELDS = ("beta", "gamma", "lam", "whiten_scores")


def compiled(model_config: ModelConfig, cfg: PPOConfig, layout: "Layout"):
    """(rollout statistics, advantages, update) jitted for this run."""
    leaves, tree = jax.tree.flatten(layout.shapes)
    key = (model_config, layout.mesh, layout.parts.key, tree, tuple((x.shape, str(x.dtype)) for x in leaves))
    makers = ((key, lambda: _rollout_stats(model_config, layout)),
              (key + ("advantages",) + tuple(getattr(cfg, f) for f in _ADVANTAGE_FIELDS),
               lambda: _advantages(cfg, layout)),
              (key + ("update",) + tuple(getattr(cfg, f) for f in _UPDATE_FIELDS),
               lambda: _update(model_config, cfg, layout)))
    for k, make in makers:
        if k not in _COMPILED:
            if len(_COMPILED) >= 12:
                _COMPILED.pop(next(iter(_COMPILED)))
            _COMPILED[k] = make()
    return tuple(_COMPILED[k] for k, _ in makers)


ROW_KEYS = ("tokens", "targets", "positions", "segment_ids")


def _rollout_stats(model_config: ModelConfig, layout: Layout):
    policy_sh, value_sh = layout.params
    parts = layout.parts

    @functools.partial(jax.jit, in_shardings=(policy_sh, value_sh, layout.frozen, layout.rows),
                       out_shardings=layout.rows)
    def stats(policy, value, frozen, rows):
        args = (rows["tokens"], rows["positions"], rows["segment_ids"])
        logp = token_logprobs(forward(model_config, parts.policy(policy, frozen), *args), rows["targets"])
        ref_logp = token_logprobs(forward(parts.ref_config, parts.reference(frozen), *args), rows["targets"])
        values = reward.token_values(model_config, parts.value(value, frozen), *args)
        return logp, ref_logp, values
    return stats


def _advantages(cfg: PPOConfig, layout: Layout):
    """scores float32[batch] and the rollout's [batch, seq] statistics → (advantages, returns) over the rows
    and the rollout's metrics (replicated scalars)."""
    @functools.partial(jax.jit, in_shardings=(layout.per_row, layout.rows, layout.rows, layout.rows, layout.rows),
                       out_shardings=(layout.rows, layout.rows, layout.replicated))
    def advantages(scores, logp, ref_logp, values, mask):
        shaped = whiten_scores(scores) if cfg.whiten_scores and scores.shape[0] > 1 else scores
        rewards, kl = kl_penalised_rewards(shaped, logp, ref_logp, mask, cfg.beta)
        adv, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
        return whiten(adv, mask), returns, {"reward": jnp.mean(scores), "kl": jnp.sum(kl) / scores.shape[0]}
    return advantages


def _update(model_config: ModelConfig, cfg: PPOConfig, layout: Layout):
    optimizer, parts = layout.optimizer, layout.parts

    def loss_fn(trainable, frozen, batch):
        policy, value = parts.policy(trainable[0], frozen), parts.value(trainable[1], frozen)
        args = (batch["tokens"], batch["positions"], batch["segment_ids"])
        mask = batch["response_mask"]
        logp = token_logprobs(forward(model_config, policy, *args), batch["targets"])
        pg, metrics = policy_loss(logp, batch["old_logp"], batch["advantages"], mask, cfg.clip)
        values = reward.token_values(model_config, value, *args)
        vf = value_loss(values, batch["old_values"], batch["returns"], mask, cfg.value_clip)
        return pg + cfg.value_coef * vf, {"policy_loss": pg, "value_loss": vf, **metrics}

    @functools.partial(jax.jit, in_shardings=(layout.params, layout.opt, layout.rows, layout.replicated,
                                              layout.frozen),
                       out_shardings=(layout.params, layout.opt, layout.replicated), donate_argnums=(0, 1))
    def update(trainable, opt_state, rollout, index, frozen):
        """One optimizer step on the minibatch rollout[index] (index int32[minibatch], the same on every
        process), gathered from the rollout's rows on the devices."""
        batch = jax.lax.with_sharding_constraint(jax.tree.map(lambda v: v[index], rollout), layout.rows)
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, frozen, batch)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        metrics["grad_norm"] = optax.global_norm(grads)
        return optax.apply_updates(trainable, updates), opt_state, metrics

    return update


def _single_device_mesh():
    from jaxllm.sharding import make_mesh
    return make_mesh(1, 1, 1, devices=jax.devices()[:1])


@jax.jit
def _means(tree):
    return jax.tree.map(jnp.mean, tree)


def _mean_metrics(scored: dict) -> dict:
    """Batch means of a scorer's extra per-row outputs (R_h, R_s, safety_used, ...), replicated."""
    extra = {k: v for k, v in scored.items() if k != "score"}
    return _means(extra) if extra else {}


def ppo(model_config: ModelConfig, policy, prompts: list[list[int]], scorer: Callable, cfg: PPOConfig, *,
        value=None, mesh=None, run_dir: str | Path | None = None, stop_ids=(), pad_id: int = 0,
        vocab_limit: int | None = None, safety=None, on_iteration: Callable | None = None,
        run_lock=None, log: Callable = print, parts=None) -> "PPOResult":
    """Run PPO; returns a `PPOResult`: (policy params, value params, list of per-iteration metrics), with
    `stop_reason` and `exit_code`.

    prompts: token id lists (sampled in order, cycling); safety: one bool per prompt (Llama 2's safety tag,
    rows["safety"] for the scorer). scorer(rows) → float32[batch] scores of the prompt+response rows (see
    `response_rows`; global arrays on the mesh), or a dict of them with "score" (see `rewards`), whose other
    entries are averaged into the metrics. `value` defaults to the policy backbone plus a fresh head.
    mesh: the (data, fsdp, tensor) mesh the policy, reference, value model and optimizer state are sharded
    on and the rollouts split over, as in training (default: one device); it may span several processes,
    each calling `ppo` with the same arguments.
    With `run_dir`, the run engine (`jaxllm.train.engine.Run`) owns the run: RUN/lock (`run_lock`: one the
    caller already holds), checkpoints in RUN/checkpoints (policy "params", "value", "opt_state" and the
    history; digests verified on resume, a damaged step quarantined and the one before used), metrics in
    RUN/ppo_metrics.jsonl and RUN/tb (cut back to the checkpoint's iteration, so none is written twice), and
    SIGTERM/SIGINT: the iteration in flight finishes, is saved, and the result's `exit_code` is 128 + the
    signal.
    `on_iteration(metrics)` runs after an iteration's metrics (and checkpoint, if due) are written.
    `parts`: what trains and what is frozen (`jaxllm.rlhf.parts`; default `WholePolicy`; `ppo_lora.LoraPolicy`
    trains adapters on a frozen base, `policy` and `value` then unused)."""
    cfg.validate()
    if safety is not None and len(safety) != len(prompts):
        raise ValueError(f"{len(safety)} safety tags for {len(prompts)} prompts")
    rng = jax.random.key(cfg.seed)
    parts = parts or WholePolicy(model_config)
    model_config = parts.config
    policy, value, frozen = parts.start(policy, value, jax.random.fold_in(rng, 7))
    layout = Layout(parts, mesh if mesh is not None else _single_device_mesh(), cfg, policy, value)
    policy_sh, value_sh = layout.params
    policy, value = _place(policy, policy_sh), _place(value, value_sh)
    # Fresh buffers: the update donates what it trains, which must share none with the caller's arrays, the
    # frozen tree or each other (the default value backbone *is* the policy's arrays). The frozen tree is
    # never donated: by default the reference is the caller's policy itself (one policy copy less).
    ref = policy if frozen is None else frozen
    trainable = (_copy(policy, policy_sh), _copy(value, value_sh))
    del policy, value
    opt_state = jax.jit(layout.optimizer.init, out_shardings=layout.opt)(trainable)
    start, history = 0, []
    primary = distributed.is_primary()
    say = log if primary else (lambda *_: None)
    with contextlib.ExitStack() as stack:
        run = None
        if run_dir is not None:
            run = stack.enter_context(Run(run_dir, model_config, arrays=ITEMS, keep=2, lock=run_lock,
                                          metrics_file="ppo_metrics.jsonl", step_key="iteration", log=say,
                                          profile=parse_window(cfg.profile, "ppo.profile")))
            policy_abstract, value_abstract = (layout.abstract(s, sh) for s, sh in zip(layout.shapes, layout.params))
            parts.record(run.run_dir / "checkpoints", bool(run.steps()))
            restored = run.restore({"params": policy_abstract, "value": value_abstract,
                                    "opt_state": layout.abstract(layout.opt_shapes, layout.opt)})
            if restored is not None:
                start, items, meta = restored
                trainable, opt_state, history = (items["params"], items["value"]), items["opt_state"], \
                    list(meta["history"])
                say(f"resumed PPO at iteration {start}")
        result = _iterations(model_config, layout, trainable, opt_state, ref, history, start, prompts, scorer, cfg,
                             rng, run, stop_ids, pad_id, vocab_limit, safety, on_iteration, say)
    return result


class PPOResult(tuple):
    """(policy params, value params, per-iteration metrics), and how the run ended: `stop_reason` ("done" or
    "signal SIGTERM"/"signal SIGINT") and `exit_code` (0, or 128 + the signal)."""

    def __new__(cls, policy, value, history, stop_reason="done", exit_code=0):
        result = super().__new__(cls, (policy, value, history))
        result.stop_reason, result.exit_code = stop_reason, exit_code
        return result


def _iterations(model_config, layout, trainable, opt_state, ref, history, start, prompts, scorer, cfg, rng, run,
                stop_ids, pad_id, vocab_limit, safety, on_iteration, say) -> PPOResult:
    """PPO's iterations `start` → cfg.iterations; with a `Run`, each iteration's metrics are logged and every
    `save_every`-th (and the last, and the one a signal interrupted) is saved."""
    stop_reason, exit_code = "done", 0
    saved = start
    sampling = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens)
    length = max(len(p) for p in prompts) + cfg.max_new_tokens
    stats_fn, advantages_fn, update = compiled(model_config, cfg, layout)
    for iteration in range(start, cfg.iterations):
        if run is not None:
            run.at_step(iteration, trainable)
        began = time.perf_counter()
        key = jax.random.fold_in(rng, iteration)
        picked = [(iteration * cfg.batch_size + i) % len(prompts) for i in range(cfg.batch_size)]
        batch_prompts = [prompts[i] for i in picked]
        weights = layout.parts.generation(trainable[0], ref, layout.axes[0], layout.mesh, cfg.generation)
        responses = []
        part = cfg.batch_size // cfg.generation_chunks
        for c in range(cfg.generation_chunks):  # each part's KV cache is freed before the next
            part_key = key if cfg.generation_chunks == 1 else jax.random.fold_in(key, c)
            responses += sample_responses(model_config, weights, batch_prompts[c * part:(c + 1) * part],
                                          sampling, part_key, stop_ids, pad_id, mesh=layout.mesh,
                                          vocab_limit=vocab_limit)[0]
        del weights  # a gathered copy is freed before the update needs the memory
        host_rows = response_rows(batch_prompts, responses, length, pad_id,
                                  safety=None if safety is None else [safety[i] for i in picked])
        rows = put_rows(host_rows, layout.mesh)
        scored = as_scores(scorer(rows))
        with layout.context():
            logp, ref_logp, values = stats_fn(trainable[0], trainable[1], ref, {k: rows[k] for k in ROW_KEYS})
            scores = _place(scored["score"], layout.per_row)  # a scorer may return numpy or any layout
            advantages, returns, rollout_metrics = advantages_fn(scores, logp, ref_logp, values,
                                                                 rows["response_mask"])
            rollout = {**{k: rows[k] for k in (*ROW_KEYS, "response_mask")}, "old_logp": logp,
                       "old_values": values, "advantages": advantages, "returns": returns}
            step_metrics = []
            order_rng = np.random.default_rng([cfg.seed, iteration])
            for _ in range(cfg.epochs):
                order = order_rng.permutation(cfg.batch_size).astype(np.int32)
                for s in range(0, cfg.batch_size, cfg.minibatch_size):
                    trainable, opt_state, m = update(trainable, opt_state, rollout,
                                                     order[s:s + cfg.minibatch_size], ref)
                    step_metrics.append(m)
        step_metrics, rollout_metrics, score_metrics = jax.device_get(
            (step_metrics, rollout_metrics, _mean_metrics(scored)))
        metrics = {"iteration": iteration + 1, **{k: float(v) for k, v in rollout_metrics.items()},
                   **{k: float(v) for k, v in score_metrics.items()},
                   "response_length": float(np.mean([len(r) for r in responses])),
                   "seconds": time.perf_counter() - began,
                   **{k: float(np.mean([m[k] for m in step_metrics])) for k in step_metrics[0]}}
        history.append(metrics)
        if run is not None:
            run.metrics.write(iteration + 1, metrics)
            if (iteration + 1) % cfg.save_every == 0 or iteration + 1 == cfg.iterations:
                saved = _save(run, iteration + 1, trainable, opt_state, history)
        safety_note = (f" R_h {metrics['reward_help']:.3f} R_s {metrics['reward_safety']:.3f} "
                       f"safety used {metrics['safety_used']:.0%}" if "safety_used" in metrics else "")
        say(f"ppo {iteration + 1}/{cfg.iterations}: reward {metrics['reward']:.4f} kl {metrics['kl']:.4f} "
            f"clip {metrics['clip_fraction']:.3f} value_loss {metrics['value_loss']:.4f} "
            f"length {metrics['response_length']:.1f}{safety_note}")
        if on_iteration:
            on_iteration(metrics)
        if run is not None and run.should_stop(iteration + 1):  # finish the iteration, save it, stop
            if saved < iteration + 1:
                saved = _save(run, iteration + 1, trainable, opt_state, history)
            stop_reason, exit_code = run.exit_code()
            say(f"stopped by {stop_reason.split()[-1]} at iteration {iteration + 1}/{cfg.iterations}; saved "
                f"in {run.run_dir / 'checkpoints'}")
            break
    return PPOResult(trainable[0], trainable[1], history, stop_reason, exit_code)


def _place(tree, shardings):
    """`tree` (numpy, or arrays on one process's devices, or global arrays) laid out on `shardings`."""
    def one(x, sh):
        if isinstance(x, jax.Array) and jax.process_count() > 1 and x.is_fully_addressable:
            x = np.asarray(x)  # a process-local array (e.g. a fresh value head): identical on every process
        return jax.device_put(x, sh)
    return jax.tree.map(one, tree, shardings)


def _copy(tree, shardings):
    return jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=shardings)(tree)


ITEMS = ("params", "value", "opt_state")  # a PPO checkpoint's array items: "params" is the policy


def _save(run, iteration: int, trainable, opt_state, history) -> int:
    return run.save(iteration, {"params": trainable[0], "value": trainable[1], "opt_state": opt_state},
                    {"history": history})
