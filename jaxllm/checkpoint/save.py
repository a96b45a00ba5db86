"""Writing parameters: `save_params` (layer-stacked leaves one chunk per layer) and `StreamedArray`
leaves written one block at a time, so conversion never holds a whole stacked weight."""
from __future__ import annotations

import asyncio
import math
import os
from typing import Callable, Iterable

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxllm import storage
from jaxllm.config import ModelConfig
from jaxllm.checkpoint import s3
from jaxllm.checkpoint.format import params_kind, write_model_config, write_record


class StreamedArray:
    """A leaf that `save_params` writes block by block: `blocks()` yields (index, array) pairs that
    together cover the leaf (e.g. `(i, layer_i)` for a layer-stacked weight); each block is produced only
    when it is written and dropped after, so one block at a time is in memory."""

    def __init__(self, shape: Iterable[int], dtype, blocks: Callable[[], Iterable[tuple[object, np.ndarray]]]):
        from jaxllm.checkpoint.digests import HostDigest

        self.shape, self.dtype, self._blocks = tuple(shape), np.dtype(dtype), blocks
        self.ndim, self.size = len(self.shape), math.prod(self.shape)
        self.nbytes = self.size * self.dtype.itemsize
        self.error: BaseException | None = None
        self.digest = HostDigest(self.shape, self.dtype)  # of the blocks as they are written

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
                    value.digest.update(index, block)
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


def is_stacked(path, leaf) -> bool:
    first = path[0] if path else None
    return getattr(first, "key", None) == "layers" and len(getattr(leaf, "shape", ())) >= 2


def save_params(directory: str | os.PathLike, params, config: ModelConfig, step: int = 0,
                save_concurrent_gb: int = 1) -> None:
    """Write a params-only checkpoint (what `convert` produces). Leaves may be numpy (memory-mapped),
    jax arrays or `StreamedArray`s; at most `save_concurrent_gb` of jax arrays is in flight and
    StreamedArrays go one block at a time, so host memory stays bounded."""
    from jaxllm.checkpoint.digests import device_digests, host_digest, path_name

    if not _streaming_supported():  # the hook is orbax-internal: without it, correct but one leaf in memory
        params = jax.tree.map(lambda leaf: leaf.materialize() if isinstance(leaf, StreamedArray) else leaf, params)
    leaves = jax.tree_util.tree_leaves_with_path(params)
    streamed = [leaf for _, leaf in leaves if isinstance(leaf, StreamedArray)]
    # Digests of what is in memory now (jax arrays where they live); streamed leaves' as they are written.
    digests = device_digests({path_name(path): leaf for path, leaf in leaves if isinstance(leaf, jax.Array)})
    digests.update({path_name(path): host_digest(leaf) for path, leaf in leaves
                    if not isinstance(leaf, (jax.Array, StreamedArray))})
    write_model_config(directory, config)
    options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False,
                                           **s3.manager_options(directory))
    handler_ = _StreamingNumpyHandler()
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, handler_), (StreamedArray, handler_), (jax.Array, ocp.type_handlers.ArrayHandler()))
    handler = ocp.PyTreeCheckpointHandler(save_concurrent_gb=save_concurrent_gb,
                                          type_handler_registry=registry)
    # One storage chunk per layer of a stacked leaf: layers can then be written and read one at a time.
    save_args = jax.tree_util.tree_map_with_path(
        lambda path, leaf: ocp.SaveArgs(shard_axes=(0,) if is_stacked(path, leaf) else ()), params)
    try:
        with ocp.CheckpointManager(storage.absolute(directory), options=options,
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
    digests.update({path_name(path): leaf.digest.value() for path, leaf in leaves
                    if isinstance(leaf, StreamedArray)})
    if jax.process_index() == 0:
        write_record(storage.absolute(directory), step, {
            "kind": params_kind(params), "digests": {"params": {k: v for k, v in digests.items() if v}}})


