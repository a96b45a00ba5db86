"""Training checkpoints: RUN/checkpoints is a jaxllm checkpoint directory (`jaxllm.checkpoint`) whose steps
hold params, opt_state, meta (step, RNG, counters) and data (this host's iterator state, one JSON file per
process through grain's orbax handler).

Saves are asynchronous (orbax copies the arrays to host memory, then writes in the background) and atomic.
Resume takes the newest step that restores completely; a newer step with missing or truncated files is
reported, moved to RUN/checkpoints.corrupt/<step>, and the one before it is used. When no step restores,
the run stops with an error and moves nothing (the cause may be the environment, not the files).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import grain
import jax
import orbax.checkpoint as ocp
from grain.checkpoint import CheckpointRestore, CheckpointSave

from jaxllm import checkpoint as jckpt
from jaxllm.config import ConfigError, ModelConfig
from jaxllm.data import DataError

ITEMS = ("params", "opt_state", "meta", "data")


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
    """Any iterator with `get_state() -> dict` / `set_state(dict)` as a grain iterator (for the handler)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def __next__(self):
        return next(self.inner)

    def get_state(self) -> dict:
        return self.inner.get_state()

    def set_state(self, state: dict) -> None:
        self.inner.set_state(state)


class RunCheckpoints:
    def __init__(self, directory: str | Path, model_config: ModelConfig, *, keep: int | None = 3,
                 async_save: bool = True):
        self.directory = Path(directory).absolute()
        if jax.process_index() == 0:
            jckpt.write_model_config(self.directory, model_config)
        self.manager = jckpt.manager(self.directory, max_to_keep=keep, async_save=async_save,
                                     item_names=ITEMS)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, params, opt_state, meta: dict, data_state: dict | None) -> None:
        items = {"params": ocp.args.StandardSave(params), "opt_state": ocp.args.StandardSave(opt_state),
                 "meta": ocp.args.JsonSave(meta)}
        if data_state is not None:
            items["data"] = CheckpointSave(_StateSnapshot(data_state))
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore_latest(self, abstract_params, abstract_opt_state, data_iterator=None, log=print):
        """(step, params, opt_state, meta) of the newest complete step, or None when there is no step.

        `data_iterator` (with set_state) is moved to the saved position. Unreadable steps newer than the
        one restored are moved to RUN/checkpoints.corrupt/; when no step restores, nothing is moved and a
        CheckpointError is raised: a run with checkpoints never silently starts over.
        """
        failures = []
        for step in reversed(self.steps()):
            try:
                restored = self._restore(step, abstract_params, abstract_opt_state, data_iterator)
            except (ConfigError, DataError, MemoryError):
                raise  # the run's set-up is wrong, not the checkpoint
            except Exception as err:  # orbax/tensorstore raise many types for missing or truncated files
                reason = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
                log(f"warning: checkpoint step {step} in {self.directory} is unreadable ({reason})")
                failures.append((step, reason))
                continue
            for bad, _ in failures:
                log(f"warning: moving unreadable step {bad} to {self.directory}.corrupt/{bad}")
                self._quarantine(bad)
            return restored
        if failures:
            listing = "; ".join(f"step {step}: {reason}" for step, reason in failures)
            raise jckpt.CheckpointError(f"{self.directory}: none of the {len(failures)} checkpoints could be "
                                        f"restored, so the run does not start over ({listing})")
        return None

    def _restore(self, step, abstract_params, abstract_opt_state, data_iterator):
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        hosts = int(meta.get("hosts", jax.process_count()))
        if data_iterator is not None and hosts != jax.process_count():
            raise ConfigError(f"{self.directory}: step {step} was written by {hosts} host(s), each with its own "
                              f"data-iterator state; resume with {hosts} host(s), not {jax.process_count()}")
        items = {"params": ocp.args.StandardRestore(abstract_params),
                 "opt_state": ocp.args.StandardRestore(abstract_opt_state),
                 "meta": ocp.args.JsonRestore()}
        step_dir = self.directory / str(step)
        if data_iterator is not None:
            if not (step_dir / "data").exists():
                raise ValueError("no data-iterator state")
            adapter = data_iterator if isinstance(data_iterator, grain.DatasetIterator) \
                else StatefulAdapter(data_iterator)
            items["data"] = CheckpointRestore(adapter)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        meta = dict(restored["meta"])
        if int(meta.get("step", -1)) != step:
            raise ValueError(f"meta.step is {meta.get('step')}")
        return step, restored["params"], restored["opt_state"], meta

    def _quarantine(self, step: int) -> None:
        if jax.process_index() == 0:
            target = Path(f"{self.directory}.corrupt") / str(step)
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                shutil.rmtree(target)
            shutil.move(str(self.directory / str(step)), str(target))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"jaxllm quarantine {step}")
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        try:
            self.manager.wait_until_finished()
        finally:
            self.manager.close()
