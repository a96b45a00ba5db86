"""The jaxllm checkpoint directory: an orbax `CheckpointManager` root plus `model.json`.

    DIR/model.json          the ModelConfig (architecture) the parameters belong to
    DIR/<step>/params/      orbax PyTree of the parameter tree (always present)
    DIR/<step>/opt_state/   optimizer state (training runs only)
    DIR/<step>/meta/        JSON: step, rng, … (training runs only)
    DIR/<step>/data/        data-iterator state (training runs only)

A converted model is step 0 with params only; `jaxllm train --init-from DIR`, `jaxllm generate` and
`jaxllm convert --from jaxllm` read it; training runs add the other items and later steps.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxllm.config import ModelConfig

MODEL_JSON = "model.json"


class CheckpointError(RuntimeError):
    """A checkpoint directory is missing, incomplete or does not match what was asked for."""


def write_model_config(directory: str | os.PathLike, config: ModelConfig) -> None:
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / (MODEL_JSON + ".tmp")
    tmp.write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    tmp.replace(path / MODEL_JSON)


def read_model_config(directory: str | os.PathLike) -> ModelConfig:
    path = Path(directory) / MODEL_JSON
    if not path.is_file():
        raise CheckpointError(f"{directory}: not a jaxllm checkpoint (no {MODEL_JSON}); convert a "
                              f"HuggingFace directory first with `jaxllm convert --from hf --to jaxllm`")
    try:
        return ModelConfig.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: invalid model config: {err}") from None


def resolve(directory: str | os.PathLike) -> Path:
    """The checkpoint directory for DIR: DIR itself, or DIR/checkpoints for a training run directory."""
    path = Path(directory)
    if not path.exists():
        raise CheckpointError(f"{directory}: no such directory")
    if not (path / MODEL_JSON).is_file() and (path / "checkpoints" / MODEL_JSON).is_file():
        return path / "checkpoints"
    return path


def find_tokenizer(directory: str | os.PathLike) -> Path | None:
    """`tokenizer.model` stored with a checkpoint (its directory or the run directory above it)."""
    path = Path(directory)
    for candidate in (path / "tokenizer.model", path / "checkpoints" / "tokenizer.model",
                      path.parent / "tokenizer.model"):
        if candidate.is_file():
            return candidate
    return None


def is_checkpoint(directory: str | os.PathLike) -> bool:
    return (Path(directory) / MODEL_JSON).is_file()


def manager(directory: str | os.PathLike, *, max_to_keep: int | None = None,
            async_save: bool = False, item_names=("params",)) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save)
    return ocp.CheckpointManager(Path(directory).absolute(), options=options, item_names=item_names)


def save_params(directory: str | os.PathLike, params, config: ModelConfig, step: int = 0,
                save_concurrent_gb: int = 1) -> None:
    """Write a params-only checkpoint (what `convert` produces). Leaves may be numpy (memory-mapped)
    or jax arrays; at most `save_concurrent_gb` is in flight, so host memory stays bounded."""
    write_model_config(directory, config)
    options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
    # orbax deep-copies host arrays by default (the whole model at once); ours are not modified while
    # saving, so they are written straight from their (memory-mapped) buffers.
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, ocp.type_handlers.ArrayHandler()))
    handler = ocp.PyTreeCheckpointHandler(save_concurrent_gb=save_concurrent_gb,
                                          type_handler_registry=registry)
    with ocp.CheckpointManager(Path(directory).absolute(), options=options,
                               item_handlers={"params": handler}) as mngr:
        mngr.save(step, args=ocp.args.Composite(params=ocp.args.PyTreeSave(params)), force=True)
        mngr.wait_until_finished()


def abstract_params(config: ModelConfig, shardings=None, dtype=None):
    """ShapeDtypeStructs to restore into (optionally sharded and/or cast)."""
    from jaxllm.models import param_shapes

    shapes = param_shapes(config)
    if shardings is None:
        shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), shapes)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, jnp.dtype(dtype or s.dtype), sharding=sh),
                        shapes, shardings)


def load_params(directory: str | os.PathLike, config: ModelConfig | None = None, *, step: int | None = None,
                shardings=None, dtype=None):
    """(params, config) from a jaxllm checkpoint's latest (or given) step.

    `shardings`: pytree of NamedSharding to restore straight onto a mesh; `dtype` casts on restore.
    """
    directory = resolve(directory)
    config = config or read_model_config(directory)
    with manager(directory) as mngr:
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{directory}: no saved step (an interrupted save leaves none)")
        target = abstract_params(config, shardings, dtype)
        try:
            restored = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
        except (ValueError, KeyError, FileNotFoundError) as err:
            raise CheckpointError(f"{directory}: step {step} does not hold parameters for "
                                  f"{config.name}: {str(err).splitlines()[0]}") from None
    return restored["params"], config


def to_numpy(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)
