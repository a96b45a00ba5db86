"""Training checkpoints: RUN/checkpoints is a jaxllm checkpoint directory (`jaxllm.checkpoint`) whose steps
hold a stage's named array items (train: params, opt_state; PPO: params, value, opt_state), meta (step, RNG,
counters, the kind of model, digests, whatever the stage records) and data (this host's iterator state, one
JSON file per process through grain's orbax handler).

Saves are asynchronous (orbax copies the arrays to host memory, then writes in the background) and atomic.
Each save records a digest of every array (computed where the arrays live, before the copy), of each
host's data-iterator state and of the meta record itself; a restore checks them all. Guarantee: what is
restored is bit for bit what was in memory when the step was saved, or the step counts as damaged — this
covers the host copy, serialisation, the disk and any later damage (up to a 2^-64 chance per array).

Resume takes the newest step that restores and verifies; a newer damaged step is reported on one line
(step, file, cause), moved to RUN/checkpoints.corrupt/<step>, and the one before it is used. When no step
restores, the run stops with an error and moves nothing (the cause may be the environment, not the files).
Retention renames old steps into RUN/checkpoints/.retired (atomic) before deleting them, and a start
removes what earlier runs provably left unfinished: interrupted saves (`*.orbax-checkpoint-tmp*` on disk;
in a gs:// bucket, where orbax writes a step in place, a step without its commit_success.txt) and steps
older than a complete one that lack an item or their commit metadata. A save that fails (the bucket cannot
be reached: the storage clients retry for about 30 s) stops the run with one line naming the step.
"""
from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from grain.checkpoint import CheckpointRestore, CheckpointSave

from jaxllm import checkpoint as jckpt
from jaxllm import storage
from jaxllm.config import ConfigError, ModelConfig
from jaxllm.data import DataError
from jaxllm.checkpoint.digests import device_digests

ARRAYS = ("params", "opt_state")  # a training run's array items (a stage may name others)
ITEMS = ARRAYS + ("meta", "data")
REQUIRED = ARRAYS + ("meta",)  # a step without one of them can never restore
RETIRED = ".retired"
_COMMIT_FILE = "_CHECKPOINT_METADATA"
_TMP_MARK = ".orbax-checkpoint-tmp"


class _StateSnapshot(grain.DatasetIterator):
    """A frozen iterator state, so an asynchronous save writes the state of the step it belongs to."""

    def __init__(self, state: dict):
        super().__init__()
        self._state = state

    def __next__(self):
        raise StopIteration

    def get_state(self) -> dict:
        return self._state

    def set_state(self, state: dict) -> None:
        self._state = state


class StatefulAdapter(grain.DatasetIterator):
    """Any iterator with `get_state() -> dict` / `set_state(dict)` as a grain iterator (for the handler);
    remembers the last state it was given, so a restore can check it against its digest."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.restored_state = None

    def __next__(self):
        return next(self.inner)

    def get_state(self) -> dict:
        return self.inner.get_state()

    def set_state(self, state: dict) -> None:
        self.restored_state = state
        self.inner.set_state(state)


def json_digest(value) -> str:
    """A digest of a JSON value's canonical text (dict order and whitespace do not matter)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _all_hosts(flag: bool) -> bool:
    """True when `flag` holds on every host (hosts must agree whether a step is good before any collective)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils
    return bool(np.min(multihost_utils.process_allgather(np.int32(flag))))


def _per_host(value: str) -> list[str]:
    """Every host's `value` (16 hex digits), in process order."""
    if jax.process_count() == 1:
        return [value]
    from jax.experimental import multihost_utils
    words = np.frombuffer(bytes.fromhex(value), np.uint32)
    return [row.tobytes().hex() for row in np.asarray(multihost_utils.process_allgather(words))]


class RunCheckpoints:
    def __init__(self, directory: str | Path, model_config: ModelConfig, *, keep: int | None = 3,
                 async_save: bool = True, log=print, arrays: tuple[str, ...] = ARRAYS):
        """Open RUN/checkpoints for the run that holds its lock (the start removes debris of earlier runs).
        `arrays`: the names of the run's array items ("params" first: the model a checkpoint exports)."""
        self.directory = storage.absolute(directory)
        self.arrays = tuple(arrays)
        self.required = self.arrays + ("meta",)
        if jax.process_index() == 0:
            jckpt.write_model_config(self.directory, model_config)
            self._remove_debris(log)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("jaxllm checkpoints opened")
        self.manager = jckpt.manager(self.directory, max_to_keep=keep, async_save=async_save,
                                     item_names=self.arrays + ("meta", "data"), retire_to=RETIRED)
        self._emptying: threading.Thread | None = None
        self._pending: int | None = None  # the step saving in the background
        self._finished = max(self.steps(), default=None)  # the newest step known to be finished
        self._failure: jckpt.CheckpointError | None = None
        jckpt.quiet_failed_saves()

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    # ------------------------------------------------------------------------------------------- save

    def save(self, step: int, params, opt_state, meta: dict, data_state: dict | None) -> None:
        """A training step's items (see `save_items`)."""
        self.save_items(step, {"params": params, "opt_state": opt_state}, meta, data_state)

    def save_items(self, step: int, arrays: dict, meta: dict, data_state: dict | None = None) -> None:
        """Record digests and kind in `meta`, then save `arrays` ({name: pytree}, the names this run opened
        with) asynchronously (the digests are computed on the arrays' devices first: the next step donates
        them)."""
        if set(arrays) != set(self.arrays):
            raise ValueError(f"checkpoint items {sorted(arrays)}, expected {sorted(self.arrays)}")
        digests = {name: device_digests(tree) for name, tree in arrays.items()}
        if data_state is not None:
            digests["data"] = _per_host(json_digest(data_state))
        meta = {**meta, "kind": jckpt.params_kind(arrays["params"]), "digests": digests}
        meta["checksum"] = json_digest(meta)
        items = {name: ocp.args.StandardSave(tree) for name, tree in arrays.items()}
        items["meta"] = ocp.args.JsonSave(meta)
        if data_state is not None:
            items["data"] = CheckpointSave(_StateSnapshot(data_state))
        self._settle()  # a failure of the previous save names that step, not this one
        try:
            self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as err:  # noqa: BLE001 - orbax, tensorstore and the storage clients raise many types
            raise self._failed(step, err) from None
        self._pending = step
        self._empty_retired()

    def _settle(self) -> None:
        """Wait for the save in flight; a failure becomes a one-line CheckpointError naming its step."""
        if self._failure is not None:
            raise self._failure
        try:
            self.manager.wait_until_finished()
        except Exception as err:  # noqa: BLE001
            raise self._failed(self._pending, err) from None
        if self._pending is not None:
            self._finished, self._pending = self._pending, None

    def _failed(self, step: int | None, err: BaseException) -> jckpt.CheckpointError:
        # orbax writes the step's commit marker last (commit_success.txt in a bucket, the rename on disk), so
        # an unfinished step is never listed, and the next start removes its files
        cause = storage.unreachable(err)
        cause = f"the storage server cannot be reached ({cause})" if cause else jckpt.describe_failure(err)
        then = f"resumes from step {self._finished}" if self._finished is not None else "starts over"
        self._failure = jckpt.CheckpointError(
            f"{self.directory / str(step) if step is not None else self.directory}: the checkpoint was not saved "
            f"({cause}); the step is not marked finished, so rerunning the command {then}")
        return self._failure

    def _empty_retired(self) -> None:
        """Delete steps retention renamed away, in the background (process 0)."""
        retired = self.directory / RETIRED
        if jax.process_index() != 0 or not retired.is_dir() or (self._emptying and self._emptying.is_alive()):
            return
        doomed = list(retired.iterdir())  # only these: orbax may rename another step in meanwhile
        if doomed:
            self._emptying = threading.Thread(target=lambda: [storage.rmtree(p, ignore_errors=True) for p in doomed],
                                              name="jaxllm-retired-steps", daemon=True)
            self._emptying.start()

    # ------------------------------------------------------------------------------------------- restore

    def restore_latest(self, abstract_params, abstract_opt_state, data_iterator=None, log=print):
        """(step, params, opt_state, meta) of a training run (see `restore_items`)."""
        restored = self.restore_items({"params": abstract_params, "opt_state": abstract_opt_state},
                                      data_iterator, log=log)
        if restored is None:
            return None
        step, arrays, meta = restored
        return step, arrays["params"], arrays["opt_state"], meta

    def restore_items(self, abstract: dict, data_iterator=None, log=print):
        """(step, {name: pytree}, meta) of the newest step that restores and verifies, or None when there
        is no step. `abstract`: {name: pytree of ShapeDtypeStructs with shardings} for every array item.

        `data_iterator` (with set_state) is moved to the saved position. Damaged steps newer than the one
        restored are reported (one line each) and moved to RUN/checkpoints.corrupt/; when no step restores,
        nothing is moved and a CheckpointError is raised: a run with checkpoints never silently starts over.
        """
        jckpt.quiet_failed_reads()
        failures = []
        for step in reversed(self.steps()):
            try:
                restored = self._restore(step, abstract, data_iterator)
            except (ConfigError, DataError, MemoryError):
                raise  # the run's set-up is wrong, not the checkpoint
            except Exception as err:  # orbax/tensorstore raise many types for missing or damaged files
                failures.append((step, str(err) if isinstance(err, jckpt.DamagedCheckpoint)
                                 else jckpt.describe_failure(err)))
                continue
            for bad, reason in failures:
                self._quarantine(bad)
                log(f"warning: checkpoint step {bad} is damaged ({reason}); moved to "
                    f"{self.directory}.corrupt/{bad}, resuming from step {step}")
            if "digests" not in restored[2]:
                log(f"note: checkpoint step {step} predates digests: restored without verification")
            return restored
        if failures:
            listing = "; ".join(f"step {step}: {reason}" for step, reason in failures)
            raise jckpt.CheckpointError(f"{self.directory}: none of the {len(failures)} checkpoints could be "
                                        f"restored, so the run does not start over ({listing})")
        return None

    def _restore(self, step, abstract: dict, data_iterator):
        step_dir = self.directory / str(step)
        error = None
        try:
            meta = self._meta(step)
            hosts = int(meta.get("hosts", jax.process_count()))
            if data_iterator is not None and hosts != jax.process_count():
                raise ConfigError(f"{self.directory}: step {step} was written by {hosts} host(s), each with its "
                                  f"own data-iterator state; resume with {hosts} host(s), not {jax.process_count()}")
            restored = self.manager.restore(step, args=ocp.args.Composite(
                **{name: ocp.args.StandardRestore(tree) for name, tree in abstract.items()}))
        except ConfigError:
            raise
        except Exception as err:  # noqa: BLE001 - decided together below
            error = err
        if not _all_hosts(error is None):  # before the digests: a collective every host must join
            raise error or jckpt.DamagedCheckpoint(f"step {step} is damaged on another host")
        arrays = {name: restored[name] for name in abstract}
        jckpt.verify_digests(meta, arrays, str(step_dir))
        if data_iterator is not None:
            self._restore_data(step, meta, data_iterator)
        return step, arrays, meta

    def _meta(self, step: int) -> dict:
        path = self.directory / str(step) / "meta" / "metadata"
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as err:  # noqa: BLE001
            raise jckpt.DamagedCheckpoint(f"{path}: {jckpt.describe_failure(err)}") from None
        meta = dict(meta)
        if "checksum" in meta and json_digest({k: v for k, v in meta.items() if k != "checksum"}) != meta["checksum"]:
            raise jckpt.DamagedCheckpoint(f"{path}: differs from its checksum (changed or damaged since the save)")
        if int(meta.get("step", -1)) != step:
            raise jckpt.DamagedCheckpoint(f"{path}: records step {meta.get('step')}, not {step}")
        return meta

    def _restore_data(self, step: int, meta: dict, data_iterator) -> None:
        index, count = jax.process_index(), jax.process_count()
        path = self.directory / str(step) / "data" / f"process_{index}-of-{count}.json"
        adapter = StatefulAdapter(data_iterator)
        error = None
        try:
            if not path.parent.is_dir():
                raise jckpt.DamagedCheckpoint(f"{path.parent}: no data-iterator state")
            self.manager.restore(step, args=ocp.args.Composite(data=CheckpointRestore(adapter)))
            recorded = (meta.get("digests") or {}).get("data")
            if recorded and json_digest(adapter.restored_state) != recorded[index]:
                raise jckpt.DamagedCheckpoint(f"{path}: differs from its digest (changed or damaged since the "
                                              f"save)")
        except DataError:
            raise
        except jckpt.DamagedCheckpoint as err:
            error = err
        except Exception as err:  # noqa: BLE001
            error = jckpt.DamagedCheckpoint(f"{path}: {jckpt.describe_failure(err)}")
        if not _all_hosts(error is None):
            raise error or jckpt.DamagedCheckpoint(f"step {step}: another host's data-iterator state is damaged")

    def _quarantine(self, step: int) -> None:
        if jax.process_index() == 0:
            target = storage.path(f"{self.directory}.corrupt") / str(step)
            storage.makedirs(target.parent)
            if storage.exists(target):
                storage.rmtree(target)
            storage.rename(self.directory / str(step), target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"jaxllm quarantine {step}")
        self.manager.reload()

    # ------------------------------------------------------------------------------------------- debris

    def _remove_debris(self, log) -> None:
        """Delete what interrupted saves and retention provably left unfinished; never a complete step."""
        if not self.directory.is_dir():
            return
        removed = []
        for path in sorted(self.directory.iterdir()):
            if _TMP_MARK in path.name and path.is_dir():
                removed.append((path, "an interrupted save"))
        retired = self.directory / RETIRED
        if retired.is_dir() and not any(retired.iterdir()):
            retired.rmdir()  # emptied as it should be: nothing to report
        elif retired.is_dir():
            removed.append((retired, "steps retired by retention"))
        steps = sorted((int(p.name), p) for p in self.directory.iterdir() if p.name.isdigit() and p.is_dir())
        unfinished = [path for _, path in steps if not jckpt.step_finished(path)]  # a bucket's: no commit marker
        removed += [(path, "an interrupted save") for path in unfinished]
        steps = [(step, path) for step, path in steps if path not in unfinished]
        complete = [step for step, path in steps if not _missing(path, self.required)]
        for step, path in steps:
            if complete and step < complete[-1] and step not in complete:
                removed.append((path, f"incomplete: no {', '.join(_missing(path, self.required))}"))
        for path, why in removed:
            storage.rmtree(path, ignore_errors=True)
        if removed:
            log(f"removed unfinished checkpoint files in {self.directory}: "
                + ", ".join(f"{path.name} ({why})" for path, why in removed))

    def wait(self) -> None:
        self._settle()

    def close(self) -> None:
        try:
            self._settle()
        finally:
            try:
                self.manager.close()
            except Exception:  # noqa: BLE001 - the same failure again: _settle reported it
                if self._failure is None:
                    raise
            if self._emptying is not None:
                self._emptying.join()
            if self._failure is None:  # after a failed save the bucket may not answer: the next start empties it
                self._empty_retired()  # what the last save's retention moved away
            if self._emptying is not None:
                self._emptying.join()


def _missing(step_dir: Path, required=REQUIRED) -> list[str]:
    """What a step lacks of orbax's commit metadata and the required items ([] for a finalised step)."""
    return ([] if (step_dir / _COMMIT_FILE).is_file() else [_COMMIT_FILE]) + \
        [item for item in required if not (step_dir / item).is_dir()]
