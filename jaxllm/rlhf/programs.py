"""One PPO iteration's jitted programs with abstract arguments laid out as `jaxllm.rlhf.ppo` lays them out
(nothing allocated): what the compile-only pre-flight (`jaxllm.preflight.ppo`) compiles for a topology."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm.config import ModelConfig
from jaxllm.inference import SamplingParams
from jaxllm.rlhf.config import PPOConfig
from jaxllm.rlhf.parts import WholePolicy
from jaxllm.rlhf.ppo import ROW_KEYS, Layout, compiled
from jaxllm.stages import reward


def iteration_programs(model_config: ModelConfig, rm_configs, cfg: PPOConfig, mesh, prompt_len: int, parts=None):
    """One PPO iteration's jitted programs on `mesh`, with abstract arguments laid out as `ppo` lays them out
    (nothing allocated), for a compile-only pre-flight.

    rm_configs: the reward models' architectures (one, or Llama 2's helpfulness and safety models).
    Returns (state, programs). state: {what: abstract tree} of what a run keeps on the devices throughout
    (the trained policy and value model, the frozen reference — the caller's policy —, the reward models,
    the optimizer state). programs: [(name, jitted fn, args, kwargs, runs per iteration, state keys among
    its args, iterations of its loop with an argument-bound)] for the rollout (the copy of the policy laid
    out for generation, prefill, decode), scoring, the rollout statistics, the advantages and the update;
    decode's args are a function of the compiled prefill (its output state is decode's input).
    `prompt_len`: the longest prompt, in tokens. `parts`: the split (`WholePolicy` by default; an abstract
    `ppo_lora.LoraPolicy`: adapters and the value head train, one frozen base serves all three models)."""
    from jaxllm import sharding
    from jaxllm.inference.generate import decode_program, prefill_program, bucket, buffer_lengths, effective_vocab_limit
    from jaxllm.models import param_shapes
    from jaxllm.rlhf.rewards import sharded_scores
    from jaxllm.rlhf.rollout import generation_shardings

    cfg.validate()
    if parts is None:
        parts = WholePolicy(model_config)
        layout = Layout(parts, mesh, cfg, param_shapes(model_config), reward.abstract_params(model_config))
    else:
        trained, trained_value, _ = parts.start(None, None, jax.random.key(cfg.seed))
        layout = Layout(parts, mesh, cfg, trained, trained_value)
    model_config = parts.config
    stats_fn, advantages_fn, update = compiled(model_config, cfg, layout)
    policy, value = (layout.abstract(s, sh) for s, sh in zip(layout.shapes, layout.params))
    rm_names = ["reward model"] if len(rm_configs) == 1 else ["helpfulness reward model", "safety reward model"]
    if parts.frozen_sh is None:
        frozen_key, trained_keys = "reference policy", ("policy (trained)",)
        state = {"policy (trained)": policy, "value model (trained)": value, frozen_key: policy}
    else:  # adapters on one frozen base: the reference is the base, the policy and value model adapt it
        frozen_key, trained_keys = "frozen base", ("policy adapters (trained)", "frozen base")
        state = {"policy adapters (trained)": policy, "value adapters (trained)": value,
                 frozen_key: layout.abstract(layout.parts.layout.frozen_shapes, layout.frozen)}
    value_key = [k for k in state if k.startswith("value")][0]
    state["optimizer state"] = layout.abstract(layout.opt_shapes, layout.opt)
    frozen = state[frozen_key]
    scorers = []
    for name, rm_config in zip(rm_names, rm_configs):
        rm_shapes = reward.abstract_params(rm_config)
        rm_sh = sharding.tree_shardings(reward.logical_axes(rm_config), rm_shapes, mesh)
        state[name] = layout.abstract(rm_shapes, rm_sh)
        scorers.append((name, sharded_scores(rm_config, rm_sh, mesh)))

    def rows(batch, keys, dtype=jnp.int32, length=prompt_len + cfg.max_new_tokens):
        return {k: jax.ShapeDtypeStruct((batch, length), dtype, sharding=layout.rows) for k in keys}

    # The rollout: the policy laid out for generation (`ppo.generation`), `generate`'s prefill over the
    # left-padded prompts, then its decode loop.
    if parts.frozen_sh is None:
        gen_sh = generation_shardings(layout.axes[0], layout.shapes[0], mesh, cfg.generation)
        weights, gen_resident = layout.abstract(layout.shapes[0], gen_sh), ()
    else:  # sampled from the adapters on their base as they are laid out (`LoraPolicy.generation`)
        weights, gen_resident = parts.generation(policy, frozen, None, mesh, cfg.generation), trained_keys
    length, cache_len = buffer_lengths(model_config, prompt_len, cfg.max_new_tokens)
    part = cfg.batch_size // cfg.generation_chunks  # rollouts sampled together
    prompts = rows(part, ("tokens", "positions", "segment_ids"), length=length)
    replicated = layout.replicated
    static = dict(config=model_config, mesh=mesh, stop_ids=(model_config.eos_id,), logprobs=True,
                  sampling=SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p,
                                          max_new_tokens=bucket(cfg.max_new_tokens)),  # as `generate` compiles
                  vocab_limit=effective_vocab_limit(model_config))
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated)
    ended = jax.ShapeDtypeStruct((part,), jnp.bool_, sharding=layout.per_row)
    decode_args = lambda prefill: (weights, prefill.out_info, jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
                                   ended)
    scored = rows(cfg.batch_size, ("tokens", "positions", "segment_ids"))
    last = jax.ShapeDtypeStruct((cfg.batch_size,), jnp.int32, sharding=layout.per_row)
    per_row = jax.ShapeDtypeStruct((cfg.batch_size,), jnp.float32, sharding=layout.per_row)
    stats = rows(cfg.batch_size, ("logp", "ref_logp", "values", "response_mask"), jnp.float32)
    rollout = {**rows(cfg.batch_size, ROW_KEYS),
               **rows(cfg.batch_size, ("response_mask", "old_logp", "old_values", "advantages", "returns"),
                      jnp.float32)}
    index = jax.ShapeDtypeStruct((cfg.minibatch_size,), jnp.int32, sharding=replicated)
    updates = cfg.epochs * cfg.batch_size // cfg.minibatch_size
    programs = []
    if cfg.generation == "gathered" and parts.frozen_sh is None:
        from jaxllm.rlhf.rollout import relayout
        leaves, tree = jax.tree.flatten(gen_sh)
        programs.append(("gather for generation", relayout(tree, tuple(leaves)), (policy,), {}, 1,
                         ("policy (trained)",), None))
    programs += [
        ("prefill", prefill_program, (weights, *prompts.values(), key), {**static, "cache_len": cache_len},
         cfg.generation_chunks, gen_resident, None),
        ("decode", decode_program, decode_args, static, cfg.generation_chunks, gen_resident, cfg.max_new_tokens - 1),
        *((f"scoring ({name})", fn, (state[name], *scored.values(), last), {}, 1, (name,), None)
          for name, fn in scorers),
        ("rollout stats", stats_fn, (policy, value, frozen, rows(cfg.batch_size, ROW_KEYS)), {}, 1,
         (trained_keys[0], value_key, frozen_key), None),
        ("advantages", advantages_fn, (per_row, *stats.values()), {}, 1, (), None),
        ("update", update, ((policy, value), state["optimizer state"], rollout, index, frozen), {}, updates,
         (trained_keys[0], value_key, "optimizer state", frozen_key), None),
    ]
    return state, programs
