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
(`jaxllm.checkpoint.digests`). Readers check both: a damaged array is an error that names it, and a checkpoint of
the wrong kind is one line saying what it holds, not orbax's tree-mismatch text.

`save_params` stores layer-stacked leaves (`layers/...`) with one storage chunk per layer, and accepts
`StreamedArray` leaves that it writes one block at a time, so that conversion never holds a whole stacked
weight (35 GiB for one 70B leaf); `open_arrays` reads such leaves back one layer at a time. Both use
orbax's own array specs, so what they write is an ordinary orbax checkpoint.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import orbax.checkpoint as ocp

from jaxllm import storage
from jaxllm.config import ModelConfig
from jaxllm.checkpoint import s3
from jaxllm.checkpoint.failures import one_line

s3.install()  # every reader and writer of a checkpoint imports this module

MODEL_JSON = "model.json"
RECORD_JSON = "record.json"
KINDS = {"lm": "a language model", "reward": "a reward model"}
_TRAINED_BY = {"lm": "`jaxllm train`, `sft` or `dpo`, or `jaxllm convert`", "reward": "`jaxllm rm`"}


class CheckpointError(RuntimeError):
    """A checkpoint directory is missing, incomplete or does not match what was asked for."""


class DamagedCheckpoint(CheckpointError):
    """A step's files are missing, truncated, or hold arrays that differ from their recorded digests."""


def write_model_config(directory: str | os.PathLike, config: ModelConfig) -> None:
    storage.write_atomic(storage.path(directory) / MODEL_JSON, json.dumps(config.to_dict(), indent=2) + "\n")


def read_model_config(directory: str | os.PathLike) -> ModelConfig:
    path = storage.path(directory) / MODEL_JSON
    if not storage.is_file(path):
        raise CheckpointError(f"{directory}: not a jaxllm checkpoint (no {MODEL_JSON})"
                              f"{_what_it_is(storage.path(directory))}")
    try:
        return ModelConfig.from_dict(json.loads(storage.read_text(path)))  # a bucket's failures in one line
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
    storage.check_bucket(directory)
    path = storage.path(directory)
    if not storage.exists(path):
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
    path = storage.path(directory)
    for candidate in (path / "tokenizer.model", path / "checkpoints" / "tokenizer.model",
                      path.parent / "tokenizer.model"):
        if candidate.is_file():
            return candidate
    return None


def is_checkpoint(directory: str | os.PathLike) -> bool:
    return storage.is_file(storage.path(directory) / MODEL_JSON)


def manager(directory: str | os.PathLike, *, max_to_keep: int | None = None, async_save: bool = False,
            item_names=("params",), retire_to: str | None = None) -> ocp.CheckpointManager:
    """An orbax manager of DIR. `retire_to`: steps dropped by `max_to_keep` are renamed into DIR/<retire_to>
    (one atomic rename) instead of deleted file by file, so a kill never leaves a half-deleted step. In a
    bucket a rename is a copy, so orbax deletes there (a half-deleted step is older than the kept ones)."""
    _bound_gcs_retries()
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save,
                                           todelete_subdir=None if storage.is_remote(directory) else retire_to,
                                           **s3.manager_options(directory))
    if storage.supports_ocdbt(directory):
        return ocp.CheckpointManager(storage.absolute(directory), options=options, item_names=item_names)
    # one zarr store per array instead of an OCDBT database (see storage.supports_ocdbt)
    from grain.checkpoint import CheckpointHandler as DataHandler

    # meta and data have their own handlers; every other item is an array tree (params, opt_state, PPO's value)
    kinds = {"meta": ocp.JsonCheckpointHandler, "data": DataHandler}
    handlers = {name: kinds.get(name, lambda: ocp.StandardCheckpointHandler(use_ocdbt=False))()
                for name in item_names}
    return ocp.CheckpointManager(storage.absolute(directory), options=options, item_handlers=handlers)


# TensorStore (the arrays) retries a failed GCS request 32 times, backing off to 32 s: ~15 minutes before a
# save into an unreachable bucket fails. Bounded as gcsfs bounds the other files' requests (6 tries, ~30 s).
GCS_RETRIES = {"max_retries": 6, "initial_delay": "1s", "max_delay": "16s"}


def _bound_gcs_retries() -> None:
    from orbax.checkpoint._src.serialization import tensorstore_utils

    # orbax builds every TensorStore context from these two dicts (no option reaches them); an orbax without
    # them keeps its own retries rather than failing every save
    for name in ("_BASE_TS_CONTEXT", "_DEFAULT_OCDBT_TS_CONTEXT"):
        context = getattr(tensorstore_utils, name, None)
        if isinstance(context, dict):
            context.setdefault("gcs_request_retries", dict(GCS_RETRIES))


def step_finished(step_dir: str | os.PathLike) -> bool:
    """Whether orbax finished saving the step in `step_dir`: on disk the step was renamed into place; in a
    bucket, where it is written in place, its commit_success.txt (written last) is there."""
    return ocp.step.is_path_finalized(storage.path(step_dir), temporary_path_cls=s3.temporary_path_class(step_dir))


# ----------------------------------------------------------------------------------------- kind and digests

def params_kind(tree) -> str:
    """"reward" for a reward/value model's tree ({"backbone", "head"}), else "lm"."""
    keys = set(tree) if isinstance(tree, dict) else set()
    return "reward" if keys == {"backbone", "head"} else "lm"


def step_record(directory: str | os.PathLike, step: int) -> dict:
    """What jaxllm recorded about a step: {"kind", "digests": {item: {leaf: hex}}, ...} from its meta item
    (training runs) or record.json (params-only steps); {} for steps written before records."""
    step_dir = storage.path(directory) / str(step)
    for path in (step_dir / "meta" / "metadata", step_dir / RECORD_JSON):
        if path.is_file():
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError) as err:
                raise DamagedCheckpoint(f"{path}: unreadable ({one_line(err)})") from None
            if not isinstance(record, dict):
                raise DamagedCheckpoint(f"{path}: not a JSON object")
            return record
    return {}


def write_record(directory: Path, step: int, record: dict) -> None:
    storage.write_atomic(storage.path(directory) / str(step) / RECORD_JSON, json.dumps(record) + "\n")


def stored_kind(directory: str | os.PathLike, step: int) -> str:
    """The kind of model a step holds: as recorded, else from the stored parameter tree."""
    kind = step_record(directory, step).get("kind")
    if kind in KINDS:
        return kind
    try:
        from etils import epath

        tree = ocp.PyTreeCheckpointHandler().metadata(epath.Path(storage.path(directory) / str(step) / "params")).tree
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
    from jaxllm.checkpoint.digests import compare, device_digests

    recorded = record.get("digests") or {}
    bad = []
    for item, tree in restored.items():
        if item in recorded:
            bad += [f"{item}/{name}" for name in compare(recorded[item], device_digests(tree))]
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise DamagedCheckpoint(f"{where}: {shown} differ{'s' if len(bad) == 1 else ''} from the digest recorded "
                                f"when it was saved (the files were changed or damaged since)")
