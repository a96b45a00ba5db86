"""Compile-only pre-flight of a PPO recipe: one iteration's programs (`rlhf.programs.iteration_programs`:
the policy's copy for generation, rollout prefill and decode, reward scoring, rollout statistics, advantages,
update) compiled for a topology, on the shardings PPO uses, without checkpoints, prompts or allocating anything.

Memory: the run keeps the trained policy and value model, the frozen reference, the reward model(s) and the
optimizer state on the devices throughout; its peak is that state plus the largest of what one program
adds (its other inputs — e.g. the gathered copy of the policy that generation reads —, outputs not donated,
temporaries, code).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import jax

from jaxllm import sharding
from jaxllm.preflight import topology as topologies
from jaxllm.config import ConfigError, ModelConfig
from jaxllm.rlhf.config import PPOConfig
from jaxllm.rlhf.programs import iteration_programs
from jaxllm.preflight.report import Report, compile_program, device_bytes


def recipe_models(recipe) -> tuple[ModelConfig, tuple[ModelConfig, ...]]:
    """(policy, reward models) architectures — one reward model, or Llama 2's helpfulness and safety models
    when the recipe names `safety_reward_model` —: a checkpoint's own (model.json, or an HF config.json) where
    it is on this machine, else the recipe's `models:` section ({policy: {preset: NAME, ...}, reward_model:
    ..., safety_reward_model: ...}; a reward model defaults to the policy's architecture, the safety model to
    the helpfulness model's). Both given: they must agree."""
    from jaxllm.data import resolve_path
    from jaxllm.models import param_shapes
    from jaxllm.train.config import build_model

    section = recipe.models or {}
    keys = ["policy", "reward_model"] + (["safety_reward_model"] if getattr(recipe, "safety_reward_model", None)
                                         else [])
    fallback = {"reward_model": "policy", "safety_reward_model": "reward_model"}
    out = []
    for key in keys:
        declared, source = section.get(key), key
        while declared is None and source in fallback:
            source = fallback[source]
            declared = section.get(source)
        declared = build_model({"preset": declared} if isinstance(declared, str) else declared,
                               f"models.{key}") if declared else None
        stored = _stored_config(Path(resolve_path(getattr(recipe, key))))
        if stored is not None and declared is not None and \
                jax.tree.map(lambda x: x.shape, param_shapes(stored)) != \
                jax.tree.map(lambda x: x.shape, param_shapes(declared)):
            raise ConfigError(f"models.{key} ({declared.name}) does not match the checkpoint at "
                              f"{getattr(recipe, key)} ({stored.name})")
        config = stored or declared
        if config is None:
            raise ConfigError(f"{key} {getattr(recipe, key)} is not on this machine: to compile without it, give "
                              f"its architecture in the recipe, e.g. models: {{{key}: {{preset: llama2-7b}}}}")
        out.append(config)
    return out[0], tuple(out[1:])


def _stored_config(path: Path) -> ModelConfig | None:
    from jaxllm import checkpoint as jckpt

    if not path.exists():
        return None
    if (path / "config.json").is_file() and not jckpt.is_checkpoint(jckpt.resolve(path)):
        from jaxllm.convert.hf_config import model_config_from_hf
        return model_config_from_hf(path, None, name=path.name)
    return jckpt.read_model_config(jckpt.resolve(path))


def preflight_ppo(policy: ModelConfig, reward_models: tuple[ModelConfig, ...], cfg: PPOConfig, mesh_config,
                  topology: topologies.Topology, prompt_len: int | None = None, *, suggest: bool = True,
                  log: Callable = print, lora=None, base: str = "policy") -> Report:
    """Compile one PPO iteration for `topology` with prompts of up to `prompt_len` tokens (default: the
    policy's context minus `max_new_tokens`, the longest it can read); with `suggest`, a run that does not
    fit gets a mesh or slice that would, checked by compiling it too. `lora`: the recipe's LoraConfig (the
    policy and value model train adapters on one frozen base, `base` the policy checkpoint's path, unread)."""
    if prompt_len is None:
        prompt_len = policy.max_position_embeddings - cfg.max_new_tokens
    if prompt_len < 1:
        raise ConfigError(f"prompts of {prompt_len} tokens: ppo.max_new_tokens={cfg.max_new_tokens} leaves no room in "
                          f"the {policy.max_position_embeddings}-token context; give --prompt-tokens")
    devices = topology.devices()
    try:
        mesh = sharding.make_mesh(mesh_config.data, mesh_config.fsdp, mesh_config.tensor, devices)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    parts = None
    if lora is not None:
        from jaxllm.rlhf.ppo_lora import LoraPolicy
        parts = LoraPolicy(policy, base, lora, mesh, cfg.seed, log=log, abstract=True)
    state, programs = iteration_programs(policy, reward_models, cfg, mesh, prompt_len, parts=parts)
    state_bytes = {what: device_bytes(tree) for what, tree in state.items()}
    log(f"compiling one PPO iteration of {policy.name} ({len(programs)} programs) for {topology.describe()} ...")
    compiled = []
    with jax.set_mesh(mesh), sharding.axis_rules():
        for name, fn, args, kwargs, runs, resident, trips in programs:
            if callable(args):  # decode reads the state prefill returns
                if compiled[-1].compiled is None:
                    continue
                args = args(compiled[-1].compiled)
            compiled.append(compile_program(name, fn, args, kwargs, calls=runs, loop_trips=trips,
                                            resident=sum(state_bytes[k] for k in resident)))
    tokens = prompt_len + cfg.max_new_tokens
    adapters = "" if lora is None else (f" with rank-{lora.rank} LoRA on a frozen {parts.layout.base_dtype} base")
    report = Report(title=f"ppo {policy.name} policy{adapters}, {' + '.join(r.name for r in reward_models)} "
                          f"reward model{'s' if len(reward_models) > 1 else ''}", topology=topology,
                    devices=devices, mesh=mesh, state=state_bytes, programs=compiled, tokens=cfg.batch_size * tokens,
                    tokens_note=f"{cfg.batch_size} rollouts of up to {prompt_len} prompt + {cfg.max_new_tokens} new "
                                f"tokens" + (f", sampled in {cfg.generation_chunks} parts" if cfg.generation_chunks > 1
                                             else "") + f"; updates on minibatches of {cfg.minibatch_size}")
    if len(compiled) < len(programs):
        report.notes.append("decode not compiled: the compiler refused prefill")
    if suggest and not report.fits:
        _suggest(report, policy, reward_models, cfg, mesh_config, topology, prompt_len, log, lora, base)
    return report


def _suggest(report, policy, reward_models, cfg, mesh_config, topology, prompt_len, log, lora, base) -> None:
    """More FSDP when data parallelism replicates the state; else, when sampling is the peak, the rollouts
    sampled in twice as many parts; else a larger slice. Each checked by compiling."""
    import dataclasses

    from jaxllm.preflight.train import larger_slice

    candidates = []
    if report.mesh.shape["data"] > topology.slices:
        candidates.append((f"mesh.data={topology.slices} mesh.fsdp=-1", cfg, topology,
                           dataclasses.replace(mesh_config, data=topology.slices, fsdp=-1)))
    else:
        largest = max(report.programs, key=lambda p: p.transient)
        shards = report.mesh.shape["data"] * report.mesh.shape["fsdp"]
        chunks = 2 * cfg.generation_chunks
        if largest.name in ("prefill", "decode") and cfg.batch_size % (chunks * shards) == 0:
            candidates.append((f"ppo.generation_chunks={chunks}",
                               dataclasses.replace(cfg, generation_chunks=chunks), topology, mesh_config))
        target = larger_slice(topology, 2 * len(report.devices))
        if target is not None:
            candidates.append((f"--topology {target.name}", cfg, target, mesh_config))
    for suggestion, cfg_, target, mesh in candidates:
        report.suggestion = suggestion
        log(f"does not fit; checking {suggestion} ...")
        try:
            check = preflight_ppo(policy, reward_models, cfg_, mesh, target, prompt_len, suggest=False,
                                  log=lambda *_: None, lora=lora, base=base)
        except ConfigError as err:
            report.suggestion_result = f"not checked: {err}"
            continue
        report.suggestion_result = f"checked by compiling: {check.verdict()}"
        if check.fits:
            return
