"""The jaxllm checkpoint directory: an orbax `CheckpointManager` root plus `model.json`.

    DIR/model.json          the ModelConfig (architecture) the parameters belong to
    DIR/<step>/params/      orbax PyTree of the parameter tree (always present)
    DIR/<step>/opt_state/   optimizer state (training runs only)
    DIR/<step>/meta/        JSON: step, rng, … (training runs only)
    DIR/<step>/data/        data-iterator state (training runs only)
    DIR/<step>/record.json  kind and array digests of a params-only step (training runs keep them in meta)

A converted model is step 0 with params only; `jaxllm train --init-from DIR`, `jaxllm generate` and
`jaxllm convert --from jaxllm` read it; training runs add the other items and later steps.

Every step records the kind of model it holds ("lm" or "reward") and a digest of every saved array
(`jaxllm.digests`). Readers check both: a damaged array is an error that names it, and a checkpoint of
the wrong kind is one line saying what it holds, not orbax's tree-mismatch text.

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
RECORD_JSON = "record.json"
KINDS = {"lm": "a language model", "reward": "a reward model"}
_TRAINED_BY = {"lm": "`jaxllm train`, `sft` or `dpo`, or `jaxllm convert`", "reward": "`jaxllm rm`"}


class CheckpointError(RuntimeError):
    """A checkpoint directory is missing, incomplete or does not match what was asked for."""


class DamagedCheckpoint(CheckpointError):
    """A step's files are missing, truncated, or hold arrays that differ from their recorded digests."""


def write_model_config(directory: str | os.PathLike, config: ModelConfig) -> None:
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / (MODEL_JSON + ".tmp")
    tmp.write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    tmp.replace(path / MODEL_JSON)


def read_model_config(directory: str | os.PathLike) -> ModelConfig:
    path = Path(directory) / MODEL_JSON
    if not path.is_file():
        raise CheckpointError(f"{directory}: not a jaxllm checkpoint (no {MODEL_JSON}){_what_it_is(Path(directory))}")
    try:
        return ModelConfig.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: invalid model config: {err}") from None


def _what_it_is(directory: Path) -> str:
    """A hint that fits what `directory` holds instead of a checkpoint."""
    if (directory / "config.json").is_file():
        return "; it looks like a HuggingFace model: convert it with `jaxllm convert --from hf --to jaxllm`"
    if (directory / "config.yaml").is_file():
        return "; it is a run directory whose run has not saved a checkpoint yet"
    if any(directory.glob("consolidated.*.pth")):
        return "; it looks like a Meta checkpoint: convert it with `jaxllm convert --from hf --to jaxllm`"
    return ""


def resolve(directory: str | os.PathLike) -> Path:
    """The checkpoint directory for DIR: DIR itself, or DIR/checkpoints for a training run directory."""
    path = Path(directory)
    if not path.exists():
        raise CheckpointError(f"{directory}: no such directory")
    if path.is_file():
        holder = next((d for d in (path.parent, path.parent.parent) if is_checkpoint(d) or
                       is_checkpoint(d / "checkpoints")), None)
        raise CheckpointError(f"{directory} is a file; a checkpoint is a directory (with {MODEL_JSON})"
                              + (f": did you mean {holder}?" if holder else ""))
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


def manager(directory: str | os.PathLike, *, max_to_keep: int | None = None, async_save: bool = False,
            item_names=("params",), retire_to: str | None = None) -> ocp.CheckpointManager:
    """An orbax manager of DIR. `retire_to`: steps dropped by `max_to_keep` are renamed into DIR/<retire_to>
    (one atomic rename) instead of deleted file by file, so a kill never leaves a half-deleted step."""
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save, todelete_subdir=retire_to)
    return ocp.CheckpointManager(Path(directory).absolute(), options=options, item_names=item_names)


# ----------------------------------------------------------------------------------------- kind and digests

def params_kind(tree) -> str:
    """"reward" for a reward/value model's tree ({"backbone", "head"}), else "lm"."""
    keys = set(tree) if isinstance(tree, dict) else set()
    return "reward" if keys == {"backbone", "head"} else "lm"


def step_record(directory: str | os.PathLike, step: int) -> dict:
    """What jaxllm recorded about a step: {"kind", "digests": {item: {leaf: hex}}, ...} from its meta item
    (training runs) or record.json (params-only steps); {} for steps written before records."""
    step_dir = Path(directory) / str(step)
    for path in (step_dir / "meta" / "metadata", step_dir / RECORD_JSON):
        if path.is_file():
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError) as err:
                raise DamagedCheckpoint(f"{path}: unreadable ({_one_line(err)})") from None
            if not isinstance(record, dict):
                raise DamagedCheckpoint(f"{path}: not a JSON object")
            return record
    return {}


def _write_record(directory: Path, step: int, record: dict) -> None:
    path = directory / str(step) / RECORD_JSON
    tmp = path.with_name(RECORD_JSON + ".tmp")
    tmp.write_text(json.dumps(record) + "\n")
    tmp.replace(path)


def stored_kind(directory: str | os.PathLike, step: int) -> str:
    """The kind of model a step holds: as recorded, else from the stored parameter tree."""
    kind = step_record(directory, step).get("kind")
    if kind in KINDS:
        return kind
    try:
        from etils import epath

        tree = ocp.PyTreeCheckpointHandler().metadata(epath.Path(Path(directory) / str(step) / "params")).tree
        return params_kind(tree)
    except Exception:  # noqa: BLE001 - no readable metadata: let the restore report it
        return "lm"


def require_kind(directory: str | os.PathLike, step: int, kind: str, label=None) -> None:
    """CheckpointError unless the step holds a model of `kind`: "X holds a reward model, not a language
    model" in one line, with what trains the expected kind."""
    found = stored_kind(directory, step)
    if found != kind:
        raise CheckpointError(f"{label or directory} holds {KINDS[found]}, not {KINDS[kind]} (that comes from "
                              f"{_TRAINED_BY[kind]})")


def verify_digests(record: dict, restored: dict, where: str) -> None:
    """Compare restored trees ({item: pytree of jax arrays}) with the digests recorded at save time;
    DamagedCheckpoint naming the first tensors that differ. Items without recorded digests are skipped."""
    from jaxllm.digests import compare, device_digests

    recorded = record.get("digests") or {}
    bad = []
    for item, tree in restored.items():
        if item in recorded:
            bad += [f"{item}/{name}" for name in compare(recorded[item], device_digests(tree))]
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise DamagedCheckpoint(f"{where}: {shown} differ{'s' if len(bad) == 1 else ''} from the digest recorded "
                                f"when it was saved (the files were changed or damaged since)")


# ----------------------------------------------------------------------------------------- failures, quietly

def _one_line(err) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def describe_failure(err: BaseException) -> str:
    """The real cause of a failed restore on one line: TensorStore's own message (which names the file and
    what is wrong with it) rather than orbax's wrapper with a repr of the whole spec."""
    messages = [_one_line(e).split(" See full TensorStore details:")[0] for e in _causes(err)]
    specific = [m for m in messages if _is_storage_message(m)]
    return (specific or messages)[0][:400]


def _causes(err: BaseException) -> list[BaseException]:
    seen, out, queue = set(), [], [err]
    while queue:  # breadth first: the wrapper, then its causes and grouped exceptions
        current = queue.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        out.append(current)
        queue.extend(getattr(current, "exceptions", ()) or ())
        queue.extend([current.__cause__, current.__context__])
    return out


def _is_storage_message(message: str) -> bool:
    return ' file "' in message or message.split(":")[0] in _TS_CODES


def is_storage_failure(err: BaseException) -> bool:
    """Whether a restore failed on the stored bytes (missing, truncated, undecodable files) rather than on
    a mismatch between what was asked for and what is stored."""
    return any(isinstance(e, (OSError, json.JSONDecodeError, EOFError)) or _is_storage_message(_one_line(e))
               for e in _causes(err))


# TensorStore status codes that mean the stored bytes (not the request) are at fault.
_TS_CODES = ("DATA_LOSS", "OUT_OF_RANGE", "FAILED_PRECONDITION", "NOT_FOUND", "PERMISSION_DENIED", "UNAVAILABLE")
_quiet_installed = False


def quiet_failed_reads() -> None:
    """Silence the after-effects of a failed orbax restore (idempotent, process-wide): TensorStore reads
    still in flight complete after orbax closed its event loop ("Event loop is closed", once per array) and
    their futures are collected unretrieved. The failure itself is reported by the caller, on one line."""
    global _quiet_installed
    if _quiet_installed:
        return
    _quiet_installed = True
    import logging
    import sys

    previous = sys.unraisablehook

    def hook(unraisable):
        if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
            return
        previous(unraisable)

    sys.unraisablehook = hook

    class _Unretrieved(logging.Filter):
        def filter(self, record):
            text = record.getMessage()
            return not ("exception was never retrieved" in text and
                        ("TensorStore" in text or "reading array" in text or "tensorstore" in text))

    logging.getLogger("asyncio").addFilter(_Unretrieved())


class StreamedArray:
    """A leaf that `save_params` writes block by block: `blocks()` yields (index, array) pairs that
    together cover the leaf (e.g. `(i, layer_i)` for a layer-stacked weight); each block is produced only
    when it is written and dropped after, so one block at a time is in memory."""

    def __init__(self, shape: Iterable[int], dtype, blocks: Callable[[], Iterable[tuple[object, np.ndarray]]]):
        from jaxllm.digests import HostDigest

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


def save_params(directory: str | os.PathLike, params, config: ModelConfig, step: int = 0,
                save_concurrent_gb: int = 1) -> None:
    """Write a params-only checkpoint (what `convert` produces). Leaves may be numpy (memory-mapped),
    jax arrays or `StreamedArray`s; at most `save_concurrent_gb` of jax arrays is in flight and
    StreamedArrays go one block at a time, so host memory stays bounded."""
    from jaxllm.digests import device_digests, host_digest, path_name

    if not _streaming_supported():  # the hook is orbax-internal: without it, correct but one leaf in memory
        params = jax.tree.map(lambda leaf: leaf.materialize() if isinstance(leaf, StreamedArray) else leaf, params)
    leaves = jax.tree_util.tree_leaves_with_path(params)
    streamed = [leaf for _, leaf in leaves if isinstance(leaf, StreamedArray)]
    # Digests of what is in memory now (jax arrays where they live); streamed leaves' as they are written.
    digests = device_digests({path_name(path): leaf for path, leaf in leaves if isinstance(leaf, jax.Array)})
    digests.update({path_name(path): host_digest(leaf) for path, leaf in leaves
                    if not isinstance(leaf, (jax.Array, StreamedArray))})
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
    digests.update({path_name(path): leaf.digest.value() for path, leaf in leaves
                    if isinstance(leaf, StreamedArray)})
    if jax.process_index() == 0:
        _write_record(Path(directory).absolute(), step, {
            "kind": params_kind(params), "digests": {"params": {k: v for k, v in digests.items() if v}}})


def _is_stacked(path, leaf) -> bool:
    first = path[0] if path else None
    return getattr(first, "key", None) == "layers" and len(getattr(leaf, "shape", ())) >= 2


class StoredArray:
    """One leaf of a saved checkpoint, read a block of layers at a time (the stored chunk's extent along
    axis 0: one layer for checkpoints `save_params` wrote, possibly all of them for others). With the
    digest recorded at save time, the leaf is checked once every row has been read (DamagedCheckpoint)."""

    def __init__(self, shape, dtype, rows_per_chunk: int, read: Callable[[object], np.ndarray],
                 expected: str | None = None, name: str = ""):
        from jaxllm.digests import HostDigest, supported

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
