"""Reading parameters back: whole trees onto a mesh (`load_params`, `restore_params`, digests verified)
or one layer of one leaf at a time (`open_arrays`)."""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxllm.config import ModelConfig
from jaxllm.checkpoint.failures import describe_failure, is_storage_failure, quiet_failed_reads
from jaxllm.checkpoint.format import (CheckpointError, DamagedCheckpoint, manager, read_model_config, require_kind, resolve,
                                     step_record, verify_digests)


class StoredArray:
    """One leaf of a saved checkpoint, read a block of layers at a time (the stored chunk's extent along
    axis 0: one layer for checkpoints `save_params` wrote, possibly all of them for others). With the
    digest recorded at save time, the leaf is checked once every row has been read (DamagedCheckpoint)."""

    def __init__(self, shape, dtype, rows_per_chunk: int, read: Callable[[object], np.ndarray],
                 expected: str | None = None, name: str = ""):
        from jaxllm.checkpoint.digests import HostDigest, supported

        self.shape, self.dtype, self.rows_per_chunk, self._read = tuple(shape), np.dtype(dtype), rows_per_chunk, read
        self._block: tuple[int, np.ndarray] | None = None
        self._expected, self.name = expected, name
        self._check = HostDigest(self.shape, self.dtype) if expected and supported(self.dtype) else None

    def _fetch(self, index) -> np.ndarray:
        block = np.asarray(self._read(index))
        if self._check is not None and not self._check.covered(index):
            self._check.update(index, block)
            if self._check.complete:
                actual, self._check = self._check.value(), None
                if actual != self._expected:
                    raise DamagedCheckpoint(f"{self.name} differs from the digest recorded when it was saved "
                                            f"(the checkpoint's files were changed or damaged since)")
        return block

    def read(self) -> np.ndarray:
        """The whole leaf."""
        return self._fetch(slice(None))

    def layer(self, i: int) -> np.ndarray:
        """`leaf[i]`, reading each stored chunk once however the chunks are laid out."""
        if self.rows_per_chunk <= 1:
            return self._fetch(i)
        start = i - i % self.rows_per_chunk
        if self._block is None or self._block[0] != start:
            self._block = None  # drop the previous block before reading the next
            self._block = (start, self._fetch(slice(start, start + self.rows_per_chunk)))
        return self._block[1][i - start]

    def release(self) -> None:
        """Forget the cached block."""
        self._block = None


def open_arrays(directory: str | os.PathLike, paths: list[tuple[str, ...]], *, step: int | None = None
                ) -> dict[tuple[str, ...], StoredArray]:
    """StoredArray for each parameter path (e.g. ("layers", "mlp", "gate")) of a checkpoint's step.

    Reads through tensorstore with the spec orbax itself uses; a leaf orbax stored some other way is
    restored whole through orbax instead."""
    directory = resolve(directory)
    step = latest_step(directory, step)
    require_kind(directory, step, "lm")
    params_dir = directory / str(step) / "params"
    digests = (step_record(directory, step).get("digests") or {}).get("params", {})
    checks = {path: (digests.get("/".join(path)), f"{params_dir}: {'/'.join(path)}") for path in paths}
    try:
        return _open_direct(params_dir, paths, checks)
    except Exception:  # noqa: BLE001 - any layout we do not recognise: let orbax read it
        return _open_via_orbax(directory, step, paths, checks)


def _open_direct(params_dir: Path, paths, checks):
    import tensorstore as ts
    from etils import epath

    metadata = ocp.PyTreeCheckpointHandler().metadata(epath.Path(params_dir))
    use_ocdbt = ocp.type_handlers.is_ocdbt_checkpoint(epath.Path(params_dir))
    context = ocp.type_handlers.get_ts_context(use_ocdbt=use_ocdbt)
    result = {}
    for path in paths:
        node = metadata.tree
        for key in path:
            node = node[key]
        info = ocp.type_handlers.ParamInfo(name=node.name, parent_dir=epath.Path(node.directory),
                                           use_zarr3=bool(metadata.use_zarr3), ts_context=context)
        store = ts.open(ts.Spec(ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=use_ocdbt)),
                        open=True, context=context).result()
        if tuple(store.shape) != tuple(node.shape):
            raise ValueError(f"{node.name}: stored shape {store.shape} differs from its metadata")
        chunk = node.storage.chunk_shape if node.storage is not None else None
        rows = chunk[0] if chunk else (store.shape[0] if store.shape else 1)
        result[path] = StoredArray(store.shape, store.dtype.numpy_dtype, rows,
                                   functools.partial(_read_store, store, params_dir / node.name), *checks[path])
    return result


def _read_store(store, where: Path, index) -> np.ndarray:
    try:
        return store[index].read().result()
    except Exception as err:  # noqa: BLE001 - tensorstore reports missing/corrupt data as ValueError etc.
        raise CheckpointError(f"{where}: cannot read stored array ({str(err).splitlines()[0][:200]})") from None


def _open_via_orbax(directory: Path, step: int, paths, checks):
    """Leaves restored whole (numpy) through orbax's partial restore, each when first read: the old way,
    one stacked leaf in memory at a time."""
    try:
        from etils import epath

        tree = ocp.PyTreeCheckpointHandler().metadata(epath.Path(directory / str(step) / "params")).tree
    except Exception:  # noqa: BLE001 - no metadata: learn the shapes by restoring
        tree = None
    result = {}
    for path in paths:
        read = functools.partial(_restore_leaf, directory, step, path)
        node = tree
        try:
            for key in path:
                node = node[key]
            shape, dtype = tuple(node.shape), node.dtype
        except (TypeError, KeyError, AttributeError):
            value = read(slice(None))
            shape, dtype, read = value.shape, value.dtype, (lambda index, value=value: value[index])
        result[path] = StoredArray(shape, dtype, shape[0] if shape else 1, read, *checks[path])
    return result


def _restore_leaf(directory: Path, step: int, path, index) -> np.ndarray:
    item, restore = {}, {}
    _set_path(item, path, np.zeros((), np.float32))
    _set_path(restore, path, ocp.RestoreArgs(restore_type=np.ndarray))
    try:
        with manager(directory) as mngr:
            out = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.PyTreeRestore(
                item=item, restore_args=restore, partial_restore=True)))["params"]
        for key in path:
            out = out[key]
    except (ValueError, KeyError, FileNotFoundError) as err:
        raise CheckpointError(f"{directory}: step {step} has no readable parameter {'/'.join(path)}: "
                              f"{str(err).splitlines()[0][:200] if str(err) else type(err).__name__}") from None
    return np.asarray(out)[index]


def _set_path(tree: dict, path, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


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
    """(params, config) from a jaxllm checkpoint's latest (or given) step, verified against the digests
    recorded when it was saved.

    `shardings`: pytree of NamedSharding to restore straight onto a mesh; `dtype` (default: `config`'s
    param_dtype) casts after the check.
    """
    directory = resolve(directory)
    stored = read_model_config(directory)
    config = config or stored
    # Read in the dtype it was saved in: the digests were taken of those bytes (a bf16 release
    # restored straight into float32 would differ from every one of them).
    target = abstract_params(config, shardings, dtype=stored.param_dtype)
    params = restore_params(directory, target, step=step, kind="lm",
                            what=f"parameters for {config.name}")
    dtype = jnp.dtype(dtype or config.param_dtype)
    if any(leaf.dtype != dtype for leaf in jax.tree.leaves(params)):
        params = _cast(params, dtype)
    return params, config


def _cast(params, dtype):
    """Each leaf cast where it lives, one at a time (the stored copy of a leaf is freed after its cast)."""
    out = {}
    for key, value in params.items():
        if isinstance(value, dict):
            out[key] = _cast(value, dtype)
        elif value.dtype != jnp.dtype(dtype):
            out[key] = jax.jit(lambda x: x.astype(dtype))(value)
            value.delete()
        else:
            out[key] = value
    return out


def latest_step(directory: Path, step: int | None = None) -> int:
    """`step`, or the newest finalised step of a checkpoint directory; CheckpointError when there is none."""
    if step is not None:
        return step
    with manager(directory) as mngr:
        step = mngr.latest_step()
    if step is None:
        raise CheckpointError(f"{directory}: no saved step (an interrupted save leaves none)")
    return step


def restore_params(directory: Path, target, *, step: int | None = None, kind: str = "lm",
                   what: str = "parameters"):
    """The `params` item of a step restored into `target` (ShapeDtypeStructs, possibly sharded), after
    checking the step holds a model of `kind`, and verified against its recorded digests. One-line
    CheckpointErrors: no step, wrong kind, unreadable or damaged files."""
    step = latest_step(directory, step)
    require_kind(directory, step, kind)
    record = step_record(directory, step)
    quiet_failed_reads()
    with manager(directory) as mngr:
        try:
            restored = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
        except Exception as err:  # noqa: BLE001 - tensorstore/orbax raise many types
            if is_storage_failure(err):
                raise DamagedCheckpoint(f"{directory}: step {step} is damaged: {describe_failure(err)}") from None
            raise CheckpointError(f"{directory}: step {step} does not hold {what}: {describe_failure(err)}") \
                from None
    verify_digests(record, {"params": restored["params"]}, f"{directory}: step {step}")
    return restored["params"]
def to_numpy(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def restore_tree(mngr, step: int, target, item: str = "params"):
    """`item` of `step` in an open manager (`manager(...)`), restored as `target` (a pytree of
    ShapeDtypeStructs with shardings)."""
    return mngr.restore(step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(target)}))[item]


def restore_leaves(mngr, step: int, target):
    """Only the leaves in `target` (nested dicts of ShapeDtypeStructs with shardings, in the dtype wanted) of
    `step`'s params: the rest of the stored tree is not read."""
    args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, dtype=s.dtype, global_shape=s.shape),
                        target)
    return mngr.restore(step, args=ocp.args.Composite(params=ocp.args.PyTreeRestore(
        item=target, restore_args=args, partial_restore=True)))["params"]
