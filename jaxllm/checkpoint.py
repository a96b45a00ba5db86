"""The jaxllm checkpoint directory: an orbax `CheckpointManager` root plus `model.json`.

    DIR/model.json          the ModelConfig (architecture) the parameters belong to
    DIR/<step>/params/      orbax PyTree of the parameter tree (always present)
    DIR/<step>/opt_state/   optimizer state (training runs only)
    DIR/<step>/meta/        JSON: step, rng, … (training runs only)
    DIR/<step>/data/        data-iterator state (training runs only)

A converted model is step 0 with params only; `jaxllm train --init-from DIR`, `jaxllm generate` and
`jaxllm convert --from jaxllm` read it; training runs add the other items and later steps.

`save_params` stores layer-stacked leaves (`layers/...`) with one storage chunk per layer, and accepts
`StreamedArray` leaves that it writes one block at a time, so that conversion never holds a whole stacked
weight (35 GiB for one 70B leaf); `open_arrays` reads such leaves back one layer at a time. Both use
orbax's own array specs, so what they write is an ordinary orbax checkpoint.
"""
from __future__ import annotations

import asyncio
import functools
import json
import math
import os
from pathlib import Path
from typing import Callable, Iterable

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


class StreamedArray:
    """A leaf that `save_params` writes block by block: `blocks()` yields (index, array) pairs that
    together cover the leaf (e.g. `(i, layer_i)` for a layer-stacked weight); each block is produced only
    when it is written and dropped after, so one block at a time is in memory."""

    def __init__(self, shape: Iterable[int], dtype, blocks: Callable[[], Iterable[tuple[object, np.ndarray]]]):
        self.shape, self.dtype, self._blocks = tuple(shape), np.dtype(dtype), blocks
        self.ndim, self.size = len(self.shape), math.prod(self.shape)
        self.nbytes = self.size * self.dtype.itemsize
        self.error: BaseException | None = None

    def blocks(self):
        return self._blocks()

    def materialize(self) -> np.ndarray:
        """The whole leaf in memory (for an orbax without the streaming hook)."""
        out = np.empty(self.shape, self.dtype)
        for index, block in self.blocks():
            out[index] = block
        return out


class _StreamingNumpyHandler(ocp.type_handlers.NumpyHandler):
    """orbax's numpy handler, plus StreamedArray: into the array orbax creates (its spec, so its metadata
    and layout), blocks are written one at a time across all leaves."""

    def __init__(self, blocks_in_flight: int = 1):
        super().__init__(deepcopy_host_arrays=False)  # ours are not modified while saving
        self._in_flight, self._loop, self._gate = blocks_in_flight, None, None

    async def _open_and_write(self, value, tspec, ts_context):
        if not isinstance(value, StreamedArray):
            return await super()._open_and_write(value, tspec, ts_context)
        import tensorstore as ts

        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # orbax may run each save on a fresh event loop
            self._loop, self._gate = loop, asyncio.Semaphore(self._in_flight)
        store = await ts.open(ts.Spec(tspec), create=True, open=True, context=ts_context)
        try:
            blocks = iter(value.blocks())
            while True:
                async with self._gate:  # produce and write under the gate: bounded memory
                    item = next(blocks, None)
                    if item is None:
                        break
                    index, block = item
                    if block.dtype != value.dtype:
                        raise TypeError(f"block {index} has dtype {block.dtype}, expected {value.dtype}")
                    await store[index].write(block)
                    big = block.nbytes >= _TRIM_BYTES
                    del block, item
                    if big:
                        trim_host_memory()
        except BaseException as err:
            value.error = err
            raise


_TRIM_BYTES = 8 * 2**20
_libc = None


def trim_host_memory() -> None:
    """Give freed heap memory back to the OS (glibc keeps it in per-thread arenas otherwise: tensorstore's
    worker threads would leave hundreds of MB of freed chunk buffers counted against the process)."""
    global _libc
    if _libc is None:
        try:
            import ctypes

            _libc = ctypes.CDLL("libc.so.6")
            _libc.malloc_trim  # noqa: B018 - glibc only
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


def _streaming_supported() -> bool:
    return callable(getattr(ocp.type_handlers.NumpyHandler, "_open_and_write", None))


def save_params(directory: str | os.PathLike, params, config: ModelConfig, step: int = 0,
                save_concurrent_gb: int = 1) -> None:
    """Write a params-only checkpoint (what `convert` produces). Leaves may be numpy (memory-mapped),
    jax arrays or `StreamedArray`s; at most `save_concurrent_gb` of jax arrays is in flight and
    StreamedArrays go one block at a time, so host memory stays bounded."""
    if not _streaming_supported():  # the hook is orbax-internal: without it, correct but one leaf in memory
        params = jax.tree.map(lambda leaf: leaf.materialize() if isinstance(leaf, StreamedArray) else leaf, params)
    streamed = [leaf for leaf in jax.tree.leaves(params) if isinstance(leaf, StreamedArray)]
    write_model_config(directory, config)
    options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
    handler_ = _StreamingNumpyHandler()
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, handler_), (StreamedArray, handler_), (jax.Array, ocp.type_handlers.ArrayHandler()))
    handler = ocp.PyTreeCheckpointHandler(save_concurrent_gb=save_concurrent_gb,
                                          type_handler_registry=registry)
    # One storage chunk per layer of a stacked leaf: layers can then be written and read one at a time.
    save_args = jax.tree_util.tree_map_with_path(
        lambda path, leaf: ocp.SaveArgs(shard_axes=(0,) if _is_stacked(path, leaf) else ()), params)
    try:
        with ocp.CheckpointManager(Path(directory).absolute(), options=options,
                                   item_handlers={"params": handler}) as mngr:
            mngr.save(step, args=ocp.args.Composite(params=ocp.args.PyTreeSave(params, save_args=save_args)),
                      force=True)
            mngr.wait_until_finished()
    except Exception:
        # orbax wraps failures of the background writes; the producer's own error is the useful one
        for leaf in streamed:
            if isinstance(leaf.error, Exception):
                raise leaf.error from None
        raise


def _is_stacked(path, leaf) -> bool:
    first = path[0] if path else None
    return getattr(first, "key", None) == "layers" and len(getattr(leaf, "shape", ())) >= 2


class StoredArray:
    """One leaf of a saved checkpoint, read a block of layers at a time (the stored chunk's extent along
    axis 0: one layer for checkpoints `save_params` wrote, possibly all of them for others)."""

    def __init__(self, shape, dtype, rows_per_chunk: int, read: Callable[[object], np.ndarray]):
        self.shape, self.dtype, self.rows_per_chunk, self._read = tuple(shape), np.dtype(dtype), rows_per_chunk, read
        self._block: tuple[int, np.ndarray] | None = None

    def read(self) -> np.ndarray:
        """The whole leaf."""
        return np.asarray(self._read(slice(None)))

    def layer(self, i: int) -> np.ndarray:
        """`leaf[i]`, reading each stored chunk once however the chunks are laid out."""
        if self.rows_per_chunk <= 1:
            return np.asarray(self._read(i))
        start = i - i % self.rows_per_chunk
        if self._block is None or self._block[0] != start:
            self._block = None  # drop the previous block before reading the next
            self._block = (start, np.asarray(self._read(slice(start, start + self.rows_per_chunk))))
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
    with manager(directory) as mngr:
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{directory}: no saved step (an interrupted save leaves none)")
    params_dir = directory / str(step) / "params"
    try:
        return _open_direct(params_dir, paths)
    except Exception:  # noqa: BLE001 - any layout we do not recognise: let orbax read it
        return _open_via_orbax(directory, step, paths)


def _open_direct(params_dir: Path, paths):
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
                                   functools.partial(_read_store, store, params_dir / node.name))
    return result


def _read_store(store, where: Path, index) -> np.ndarray:
    try:
        return store[index].read().result()
    except Exception as err:  # noqa: BLE001 - tensorstore reports missing/corrupt data as ValueError etc.
        raise CheckpointError(f"{where}: cannot read stored array ({str(err).splitlines()[0][:200]})") from None


def _open_via_orbax(directory: Path, step: int, paths):
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
        result[path] = StoredArray(shape, dtype, shape[0] if shape else 1, read)
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
