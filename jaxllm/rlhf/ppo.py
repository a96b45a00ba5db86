"""PPO with a KL penalty against the frozen starting policy (Llama 2 §3.2.3, Ziya's RLHF).

One iteration: sample responses for a batch of prompts (jitted KV-cached sampler) → score them (reward
model, or any `scorer(rows) -> float32[batch]`) → per-token rewards −β·KL plus the score at the last token
→ GAE over the value head → whitened advantages → `epochs` passes of clipped-surrogate + clipped value
loss over minibatches, AdamW with a constant learning rate and gradient clipping.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxllm.config import ModelConfig
from jaxllm.inference import SamplingParams
from jaxllm.models import forward
from jaxllm.rlhf.objectives import gae, kl_penalised_rewards, masked_mean, policy_loss, value_loss, whiten
from jaxllm.rlhf.rollout import response_rows, sample_responses
from jaxllm.stages import reward
from jaxllm.stages.losses import token_logprobs


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    iterations: int = 200
    batch_size: int = 64            # prompts (rollouts) per iteration
    minibatch_size: int = 16
    epochs: int = 1                 # passes over each rollout batch
    lr: float = 1e-6                # constant (spec §3.3)
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-5
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    beta: float = 0.01              # KL penalty: 0.01 for 7B/13B, 0.005 for 70B
    clip: float = 0.2               # PPO ratio clip
    value_clip: float = 0.2
    value_coef: float = 0.5
    gamma: float = 1.0
    lam: float = 0.95
    whiten_scores: bool = True      # whiten reward-model scores over each batch
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    save_every: int = 20

    def validate(self) -> None:
        from jaxllm.config import ConfigError
        if self.batch_size % self.minibatch_size:
            raise ConfigError(f"ppo.batch_size={self.batch_size} is not a multiple of "
                              f"ppo.minibatch_size={self.minibatch_size}")
        for name in ("iterations", "batch_size", "minibatch_size", "epochs", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ppo.{name} must be >= 1")
        if self.beta < 0 or self.lr <= 0:
            raise ConfigError("ppo.beta must be >= 0 and ppo.lr > 0")


def _optimizer(cfg: PPOConfig):
    def decay_mask(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: not any(getattr(k, "key", None) == "scale" for k in path), params)
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm),
                       optax.adamw(cfg.lr, cfg.b1, cfg.b2, cfg.eps, cfg.weight_decay, mask=decay_mask))


@functools.lru_cache(maxsize=4)
def _rollout_stats(model_config: ModelConfig):
    @jax.jit
    def stats(policy, value, ref, rows):
        args = (rows["tokens"], rows["positions"], rows["segment_ids"])
        logp = token_logprobs(forward(model_config, policy, *args), rows["targets"])
        ref_logp = token_logprobs(forward(model_config, ref, *args), rows["targets"])
        values = reward.token_values(model_config, value, *args)
        return logp, ref_logp, values
    return stats


@functools.lru_cache(maxsize=4)
def _update(model_config: ModelConfig, cfg: PPOConfig):
    optimizer = _optimizer(cfg)

    def loss_fn(trainable, batch):
        policy, value = trainable
        args = (batch["tokens"], batch["positions"], batch["segment_ids"])
        mask = batch["response_mask"]
        logp = token_logprobs(forward(model_config, policy, *args), batch["targets"])
        pg, metrics = policy_loss(logp, batch["old_logp"], batch["advantages"], mask, cfg.clip)
        values = reward.token_values(model_config, value, *args)
        vf = value_loss(values, batch["old_values"], batch["returns"], mask, cfg.value_clip)
        return pg + cfg.value_coef * vf, {"policy_loss": pg, "value_loss": vf, **metrics}

    @jax.jit
    def update(trainable, opt_state, batch):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, batch)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        metrics["grad_norm"] = optax.global_norm(grads)
        return optax.apply_updates(trainable, updates), opt_state, metrics

    return optimizer, update


def reward_model_scorer(rm_config: ModelConfig, rm_params) -> Callable:
    score = jax.jit(functools.partial(reward.scores, rm_config))
    return lambda rows: np.asarray(score(rm_params, rows["tokens"], rows["positions"], rows["segment_ids"],
                                         rows["last"]))


def ppo(model_config: ModelConfig, policy, prompts: list[list[int]], scorer: Callable, cfg: PPOConfig, *,
        value=None, run_dir: str | Path | None = None, stop_ids=(), pad_id: int = 0,
        on_iteration: Callable | None = None, log: Callable = print):
    """Run PPO; returns (policy params, value params, list of per-iteration metrics).

    prompts: token id lists (sampled in order, cycling); scorer(rows) → float32[batch] scores of the
    prompt+response rows (see `response_rows`). `value` defaults to the policy backbone plus a fresh head.
    With `run_dir`, metrics go to RUN/ppo_metrics.jsonl and checkpoints to RUN/checkpoints (resumed)."""
    cfg.validate()
    ref = policy
    rng = jax.random.key(cfg.seed)
    if value is None:
        value = reward.from_lm_params(policy, model_config, jax.random.fold_in(rng, 7))
    optimizer, update = _update(model_config, cfg)
    trainable = (policy, value)
    opt_state = optimizer.init(trainable)
    start, history = 0, []
    manager = None
    if run_dir is not None:
        manager, restored = _checkpoints(Path(run_dir), model_config, trainable, opt_state)
        if restored is not None:
            start, trainable, opt_state, history = restored
            log(f"resumed PPO at iteration {start}")
    sampling = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens)
    length = max(len(p) for p in prompts) + cfg.max_new_tokens
    stats_fn = _rollout_stats(model_config)
    for iteration in range(start, cfg.iterations):
        began = time.perf_counter()
        key = jax.random.fold_in(rng, iteration)
        batch_prompts = [prompts[(iteration * cfg.batch_size + i) % len(prompts)] for i in range(cfg.batch_size)]
        responses, _ = sample_responses(model_config, trainable[0], batch_prompts, sampling, key, stop_ids, pad_id)
        rows = response_rows(batch_prompts, responses, length, pad_id)
        scores = np.asarray(scorer(rows), np.float32)
        logp, ref_logp, values = stats_fn(trainable[0], trainable[1], ref, rows)
        mask = jnp.asarray(rows["response_mask"])
        shaped = (scores - scores.mean()) / (scores.std() + 1e-8) if cfg.whiten_scores and len(scores) > 1 else scores
        rewards, kl = kl_penalised_rewards(jnp.asarray(shaped), logp, ref_logp, mask, cfg.beta)
        advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
        advantages = whiten(advantages, mask)
        data = {**{k: rows[k] for k in ("tokens", "targets", "positions", "segment_ids", "response_mask")},
                "old_logp": np.asarray(logp), "old_values": np.asarray(values),
                "advantages": np.asarray(advantages), "returns": np.asarray(returns)}
        step_metrics = []
        order_rng = np.random.default_rng([cfg.seed, iteration])
        for _ in range(cfg.epochs):
            order = order_rng.permutation(cfg.batch_size)
            for s in range(0, cfg.batch_size, cfg.minibatch_size):
                idx = order[s:s + cfg.minibatch_size]
                trainable, opt_state, m = update(trainable, opt_state, {k: v[idx] for k, v in data.items()})
                step_metrics.append(jax.device_get(m))
        lengths = np.asarray([len(r) for r in responses])
        metrics = {"iteration": iteration + 1, "reward": float(scores.mean()),
                   "kl": float(jnp.sum(kl) / cfg.batch_size),
                   "response_length": float(lengths.mean()),
                   "seconds": time.perf_counter() - began,
                   **{k: float(np.mean([m[k] for m in step_metrics])) for k in step_metrics[0]}}
        history.append(metrics)
        if on_iteration:
            on_iteration(metrics)
        if manager is not None:
            with open(Path(run_dir) / "ppo_metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
            if (iteration + 1) % cfg.save_every == 0 or iteration + 1 == cfg.iterations:
                _save(manager, iteration + 1, trainable, opt_state, history)
        log(f"ppo {iteration + 1}/{cfg.iterations}: reward {metrics['reward']:.4f} kl {metrics['kl']:.4f} "
            f"clip {metrics['clip_fraction']:.3f} value_loss {metrics['value_loss']:.4f} "
            f"length {metrics['response_length']:.1f}")
    if manager is not None:
        manager.wait_until_finished()
        manager.close()
    return trainable[0], trainable[1], history


def _checkpoints(run_dir: Path, model_config, trainable, opt_state):
    import orbax.checkpoint as ocp

    from jaxllm import checkpoint as jckpt

    directory = run_dir / "checkpoints"
    jckpt.write_model_config(directory, model_config)
    manager = jckpt.manager(directory, max_to_keep=2, item_names=("params", "value", "opt_state", "meta"))
    step = manager.latest_step()
    if step is None:
        return manager, None
    abstract = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    restored = manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract(trainable[0])), value=ocp.args.StandardRestore(abstract(trainable[1])),
        opt_state=ocp.args.StandardRestore(abstract(opt_state)), meta=ocp.args.JsonRestore()))
    return manager, (step, (restored["params"], restored["value"]), restored["opt_state"],
                     list(restored["meta"]["history"]))


def _save(manager, step, trainable, opt_state, history):
    import orbax.checkpoint as ocp
    manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(trainable[0]), value=ocp.args.StandardSave(trainable[1]),
        opt_state=ocp.args.StandardSave(opt_state), meta=ocp.args.JsonSave({"step": step, "history": history})),
        force=True)
