"""What a LoRA run hands the loop: the split of the stage's parameters into what trains (adapters, new
heads, `lora.train` base weights; float32, with optimizer state and checkpoints) and the frozen base (stored
in `lora.base_dtype`, bf16 or int8/int4-quantized, sharded by the same rules, passed to the step without
being donated, differentiated or saved), reading that base from `init_from`, and the record that goes with
the saved adapters (RUN/checkpoints/adapter.json). `LoraLayout` is a `jaxllm.train.split.FrozenPart`: the
loop knows no LoRA.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax

from jaxllm.lora import files as adapters
from jaxllm import checkpoint as jckpt
from jaxllm import sharding
from jaxllm.config import ConfigError
from jaxllm.models import init_params as model_init_params
from jaxllm.lora import model as lora
from jaxllm.lora import quant


@dataclasses.dataclass
class LoraLayout:
    mask: Any                 # pytree of bools over the stage's full parameter tree: True trains
    lm_path: tuple            # where the language model sits in that tree (() or ("backbone",))
    frozen_axes: Any          # logical axes of the frozen leaves as stored (QuantizedWeight nodes when quantized)
    frozen_shapes: Any        # ShapeDtypeStructs (or QuantizedWeights of them) as stored
    frozen_sh: Any            # NamedShardings
    base_dtype: str
    base_digest: str | None = None  # of the base read by `start`

    def abstract_frozen(self):
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), self.frozen_shapes,
                            self.frozen_sh)

    def start(self, config, plan, init_fn, log=print):
        """(frozen base, initial trainable parameters) (see `start`)."""
        frozen, initial, self.base_digest = start(config, plan, init_fn or lm_init(config), log)
        return frozen, initial

    def record(self, directory: Path, config, resuming: bool) -> None:
        check_record(directory, config, self.base_digest, self.lm_path, resuming)

    def describe(self, plan) -> str:
        return describe(plan)


def layout(config, lm_path: tuple, full_axes, full_shapes, mesh):
    """(trainable axes, trainable shapes, LoraLayout) for the stage's full tree (adapters included): the
    `split` a `lora:` section hands the loop (`RunConfig.frozen_split`)."""
    if not config.init_from:
        raise ConfigError("lora adapts a trained model: set init_from (or --init-from DIR) to the base checkpoint")
    base_dtype = config.lora.base_dtype or config.model.dtype
    mask = lora.trainable_mask(full_axes, config.lora.train, lm_path)
    axes, frozen_axes = lora.split(full_axes, mask)
    shapes, frozen_full = lora.split(full_shapes, mask)
    frozen_paths = lora.leaf_paths(frozen_full)
    structure = jax.tree.structure(frozen_full)
    stored = jax.tree.unflatten(structure, [quant.storage_shape(p[len(lm_path):], s, base_dtype, config.model.dtype)
                                            for p, s in zip(frozen_paths, jax.tree.leaves(frozen_full))])
    stored_axes = jax.tree.unflatten(structure, [
        quant.storage_axes(a, s) for a, s in zip(jax.tree.leaves(frozen_axes, is_leaf=_is_spec),
                                                  jax.tree.leaves(stored, is_leaf=_is_quantized))])
    frozen_sh = sharding.tree_shardings(stored_axes, stored, mesh)
    return axes, shapes, LoraLayout(mask, tuple(lm_path), stored_axes, stored, frozen_sh, base_dtype)


def _is_spec(x) -> bool:
    return isinstance(x, jax.sharding.PartitionSpec)


def _is_quantized(x) -> bool:
    return isinstance(x, quant.QuantizedWeight)


def start(config, plan, init_fn, log=print):
    """(frozen base, initial trainable parameters, base digest), on the plan's devices.

    The frozen leaves and the `lora.train` base weights are read from `init_from` (their digest covers them
    all); adapters start as PEFT does (B = 0: the model is the base) or from `lora.init_adapter`; other new
    leaves (a reward model's head) from the stage's initialiser `init_fn(rng)`."""
    lay: LoraLayout = plan.frozen
    n = len(lay.lm_path)
    base_config = config.base_model
    _check_base(config.init_from, base_config)
    frozen_paths = lora.leaf_paths(lay.frozen_shapes, is_leaf=_is_quantized)
    frozen_leaves = jax.tree.leaves(lay.frozen_shapes, is_leaf=_is_quantized)
    frozen_sh = jax.tree.leaves(lay.frozen_sh, is_leaf=_is_quantized)
    wanted, where = {}, {}
    for path, stored, sh in zip(frozen_paths, frozen_leaves, frozen_sh):
        if _is_quantized(stored):
            wanted[path[n:]] = (config.model.dtype, sh.qvalue, lay.base_dtype)
        else:
            wanted[path[n:]] = (stored.dtype, sh, None)
        where[path[n:]] = ("frozen", path)
    train_paths = lora.leaf_paths(plan.param_shapes)
    train_sh = dict(zip(train_paths, jax.tree.leaves(plan.param_sh)))
    for path, shape in zip(train_paths, jax.tree.leaves(plan.param_shapes)):
        if path[:n] == lay.lm_path and not lora.is_adapter_key(path[-1]):
            wanted[path[n:]] = (shape.dtype, train_sh[path], None)
            where[path[n:]] = ("train", path)
    read, digest = adapters.read_base(config.init_from, base_config, wanted)
    frozen = adapters.nest({where[p][1]: leaf for p, leaf in read.items() if where[p][0] == "frozen"})

    initial = jax.jit(lambda key: lora.split(init_fn(key), lay.mask)[0], out_shardings=plan.param_sh)(plan.init_key)
    replace = {where[p][1]: leaf for p, leaf in read.items() if where[p][0] == "train"}
    if config.lora.init_adapter:
        replace.update(_init_adapter(config, train_sh, dict(zip(train_paths, jax.tree.leaves(plan.param_shapes)))))
        log(f"adapters from {config.lora.init_adapter}")
    if replace:
        initial = adapters.nest({p: replace.get(p, x) for p, x in zip(train_paths, jax.tree.leaves(initial))})
    return frozen, initial, digest


def _check_base(path: str, base_config) -> None:
    source = jckpt.read_model_config(jckpt.resolve(path))
    if source.lora is not None:
        raise ConfigError(f"init_from {path} is itself an adapter; the base is the checkpoint it adapts "
                          f"({(adapters.read_record(path) or {}).get('base')}), or merge it first with "
                          f"`jaxllm convert --from jaxllm --to jaxllm {path} DST --merge`")
    if not adapters.same_shapes(source, base_config):
        raise ConfigError(f"init_from {path} holds {source.name} parameters that do not fit the run's model "
                          f"{base_config.name}")


def _init_adapter(config, shardings: dict, shapes: dict) -> dict:
    """The adapter leaves of `lora.init_adapter`, placed like the run's."""
    source = config.lora.init_adapter
    try:
        adapted, leaves, _ = adapters.load_adapter(source, config.base_model)
    except jckpt.CheckpointError as err:
        raise ConfigError(f"lora.init_adapter: {err}") from None
    if adapted.lora != config.model.lora:
        theirs, ours = adapted.lora, config.model.lora
        diff = [f"{f} {getattr(theirs, f)} vs {getattr(ours, f)}" for f in ("rank", "alpha", "dropout", "targets")
                if getattr(theirs, f) != getattr(ours, f)]
        if not diff:  # PEFT's rank_pattern / alpha_pattern / use_rslora: a recipe's lora section has no such keys
            diff = [f"{f} {getattr(theirs, f)!r}" for f in ("layer_ranks", "layer_alphas", "rslora")
                    if getattr(theirs, f) != getattr(ours, f)]
            raise ConfigError(f"lora.init_adapter {source} has per-layer ranks, alphas or rsLoRA ({'; '.join(diff)}); "
                              f"a run continues uniform adapters only (generate, chat and convert take it as it is)")
        raise ConfigError(f"lora.init_adapter {source} is not the adapter this run trains ({'; '.join(diff)}): set "
                          f"the lora section to match it")
    out = {}
    for path, value in leaves.items():
        if path not in shapes or tuple(shapes[path].shape) != value.shape:
            raise ConfigError(f"lora.init_adapter {source}: leaf {'/'.join(path)} {value.shape} does not fit the run")
        out[path] = jax.device_put(value.astype(shapes[path].dtype), shardings[path])
    return out


def check_record(directory: Path, config, digest: str, lm_path, resuming: bool) -> None:
    """Record which base the run adapts (RUN/checkpoints/adapter.json); a resumed run refuses another base."""
    record = adapters.read_record(directory)
    if resuming and record is not None and record.get("base_digest") not in (None, digest):
        raise ConfigError(f"init_from {config.init_from} is not the base this run adapts: its digest is {digest}, "
                          f"the run's base ({record.get('base')}) had {record['base_digest']}")
    if jax.process_index() == 0:
        adapters.write_record(directory, base=config.init_from, base_digest=digest, train=config.lora.train,
                              lm_path=lm_path)


def lm_init(config):
    """The adapted language model's random initialiser (its base half is never computed: only the trainable
    leaves leave the jit)."""
    return lambda key: model_init_params(config.model, key)


def describe(plan) -> str:
    trainable = sum(x.size for x in jax.tree.leaves(plan.param_shapes))
    return (f"LoRA: {trainable / 1e6:.2f}M trainable parameters on a frozen {plan.frozen.base_dtype} base "
            f"({quant.nbytes(plan.frozen.frozen_shapes) / 2**30:.2f} GiB)")
