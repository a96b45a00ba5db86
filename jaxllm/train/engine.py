"""The run engine: what every stage's run has, whatever the stage does in it.

    Run(run_dir, model_config, arrays=("params", "opt_state"), ...)   a context manager that owns
      the lock          RUN/lock (taken here unless the caller already holds it: `lock=`)
      checkpoints       RUN/checkpoints, items by name (`arrays`), digests, verified restore with fallback
                        past damaged steps (quarantined to RUN/checkpoints.corrupt), keep-N, async saves
                        (`jaxllm.checkpoint.training.RunCheckpoints`)
      signals           SIGTERM / SIGINT set `stop_signal`; the stage finishes its step, saves it and exits
                        with 128 + the signal (143 / 130), as `exit_code()` says
      metrics           RUN/<metrics file> (jsonl, cut back to the resumed step), TensorBoard in RUN/tb
      the mesh          `context(mesh)`: the mesh and the logical-axis rules for the jitted programs

What a stage hands it differs: a loss (pretrain / SFT / DPO / RM: `jaxllm.train.loop.train`), an iteration
(PPO: policy, value model and optimizer state as named items, the history in the meta record) or units of
sampling work (`Shards`: rejection sampling's prompt batches, each committed atomically once done, in a
directory locked like a run's).
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
from pathlib import Path
from typing import Callable

import jax
import numpy as np

from jaxllm import sharding, storage
from jaxllm.checkpoint.training import RunCheckpoints
from jaxllm.config import ConfigError, ModelConfig
from jaxllm.train import rundir
from jaxllm.train.profile import ProfileWindow
from jaxllm.train.metrics import MetricsLog

_MULTIHOST_ENV = ("COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS")


def maybe_initialize_distributed(mode: str = "auto") -> None:
    """`jax.distributed.initialize()` for multi-host TPU/GPU when the environment describes a cluster.

    JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID are passed on when set (JAX itself reads
    only the first); SLURM, Open MPI and Cloud TPU pods are detected by JAX. mode: auto | yes | no.
    """
    if mode == "no" or jax.distributed.is_initialized():
        return
    env = os.environ
    kwargs = {}
    if env.get("JAX_COORDINATOR_ADDRESS"):
        kwargs["coordinator_address"] = env["JAX_COORDINATOR_ADDRESS"]
    for var, key in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
        if env.get(var):
            try:
                kwargs[key] = int(env[var])
            except ValueError:
                raise ConfigError(f"{var}={env[var]!r} is not an integer") from None
    cluster = (bool(kwargs) or any(env.get(k) for k in _MULTIHOST_ENV)
               or int(env.get("SLURM_NTASKS", "1") or 1) > 1
               or int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1
               or "," in env.get("TPU_WORKER_HOSTNAMES", ""))
    if mode == "yes" or cluster:
        jax.distributed.initialize(**kwargs)


class Signals:
    """SIGTERM/SIGINT set a flag; the stage saves a checkpoint and exits at the end of the current step."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers, preemption via orbax only
                pass
        return self

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def stop_status(signum: int | None) -> tuple[str, int]:
    """(stop reason, exit code) of a run stopped by `signum` (None: a preemption notice)."""
    name = signal.Signals(signum).name if signum else "preemption"
    return f"signal {name}", 128 + (signum or signal.SIGTERM)


def mesh_context(mesh) -> contextlib.ExitStack:
    """The mesh and the logical-axis rules, for tracing and running a stage's jitted programs."""
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(mesh))
    stack.enter_context(sharding.axis_rules())
    return stack


class Run:
    """A stage's run in `run_dir` (see the module docstring). Use as a context manager; process 0 writes
    metrics, every process takes part in checkpoints."""

    def __init__(self, run_dir: str | Path, model_config: ModelConfig, *, arrays=("params", "opt_state"),
                 keep: int | None = 3, async_save: bool = True, lock: rundir.RunLock | None = None,
                 metrics_file: str = "metrics.jsonl", step_key: str = "step", tensorboard: bool = True,
                 profile: tuple[int, int] | None = None, log: Callable = print):
        self.run_dir, self.model_config, self.arrays = storage.path(run_dir), model_config, tuple(arrays)
        self.keep, self.async_save, self.log = keep, async_save, log
        self._lock, self._own_lock = lock, lock is None
        self._metrics_args = dict(filename=metrics_file, step_key=step_key, tensorboard=tensorboard)
        self.checkpoints: RunCheckpoints | None = None
        self.metrics: MetricsLog | None = None
        self.signals = Signals()
        self.preempted = False
        self.profile = ProfileWindow(profile, self.run_dir / "tb")
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "Run":
        try:
            if self._lock is None:
                self._lock = rundir.lock(self.run_dir, log=self.log)
                self._stack.callback(self._lock.release)
            self.checkpoints = RunCheckpoints(self.run_dir / "checkpoints", self.model_config, keep=self.keep,
                                              async_save=self.async_save, log=self.log, arrays=self.arrays)
            self._stack.callback(self.checkpoints.close)
            self._stack.enter_context(self.signals)
            self._stack.callback(self.profile.close)
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    # -------------------------------------------------------------------------------- checkpoints

    def restore(self, abstract: dict, data_iterator=None):
        """(step, {item: tree}, meta) of the newest good step, damaged newer ones quarantined (one line
        each); None for a new run. Opens the metrics log at the restored step (later records dropped)."""
        restored = self.checkpoints.restore_items(abstract, data_iterator, log=self.log)
        self.open_metrics(restored[0] if restored is not None else 0)
        return restored

    def save(self, step: int, arrays: dict, meta: dict, data_state: dict | None = None) -> int:
        self.checkpoints.save_items(step, arrays, {"step": step, "hosts": jax.process_count(), **meta}, data_state)
        return step

    def steps(self) -> list[int]:
        return self.checkpoints.steps()

    # -------------------------------------------------------------------------------- stopping

    def at_step(self, done: int, sync=None) -> None:
        """Between steps (`done` finished): opens or closes the profile window. `sync`: the last step's
        outputs, waited on before a trace stops."""
        self.profile.step(done, sync)

    def should_stop(self, step: int) -> bool:
        """A signal came, or (several hosts) the cluster announced a preemption at `step`."""
        if jax.process_count() > 1 and self.checkpoints.manager.reached_preemption(step):
            self.preempted = True
        return self.signals.received is not None or self.preempted

    def exit_code(self) -> tuple[str, int]:
        """("done", 0), or the signal's stop reason and 128 + its number."""
        if self.signals.received is None and not self.preempted:
            return "done", 0
        return stop_status(self.signals.received)

    # -------------------------------------------------------------------------------- metrics

    def open_metrics(self, resume_step: int) -> MetricsLog:
        if self.metrics is None:
            self.metrics = MetricsLog(self.run_dir, resume_step, enabled=jax.process_index() == 0,
                                      **self._metrics_args)
            self._stack.callback(self.metrics.close)
        return self.metrics


class Shards:
    """Units of sampling work, each committed once done: DIR/<index>.json written whole (a file beside it,
    then renamed), so a killed run loses at most the unit in flight and a rerun skips the finished ones.

    DIR/run.json records what the units belong to (`fingerprint`, e.g. the recipe and the prompts); units of
    another run are discarded with one line. Process 0 writes; every process reads the same files, and
    `done` agrees across processes on which units are finished.

    DIR is locked like a run directory (`rundir.lock`: DIR/lock, RunDirLocked in one line while another
    process samples into it) until `remove()` or the end of the process."""

    def __init__(self, directory: str | Path, fingerprint: dict, count: int, log: Callable = print):
        self.directory, self.count = storage.path(directory), count  # local, or a prefix in a bucket
        self.lock = rundir.lock(self.directory, log=log)  # one writer of these units (and of their output)
        fingerprint = json.loads(json.dumps(fingerprint))  # as it reads back (tuples are lists)
        record = self.directory / "run.json"
        primary = jax.process_index() == 0
        same = False
        if storage.is_file(record):
            try:
                same = json.loads(storage.read_text(record)) == fingerprint
            except ValueError:
                same = False
        if not _agreed(same) and primary:
            units = self._units()
            if storage.is_file(record) or units:
                log(f"{self.directory}: finished units of another run discarded")
            for path in units:
                storage.remove(path)
        if primary:
            write_run_file(record, json.dumps(fingerprint, sort_keys=True))
        self._done = self._finished()

    def _finished(self) -> np.ndarray:
        names = set(storage.listdir(self.directory)) if storage.is_dir(self.directory) else set()  # one listing
        done = np.array([f"{i}.json" in names for i in range(self.count)], np.int32)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            done = np.asarray(multihost_utils.broadcast_one_to_all(done))
        return done.astype(bool)

    def done(self, index: int) -> bool:
        return bool(self._done[index])

    def load(self, index: int):
        return json.loads(storage.read_text(self.directory / f"{index}.json"))

    def commit(self, index: int, result) -> None:
        if jax.process_index() == 0:
            write_run_file(self.directory / f"{index}.json", json.dumps(result))
        self._done[index] = True

    def remove(self) -> None:
        """Once the run's output is written: the units are no longer needed."""
        if jax.process_index() == 0:
            for path in self._units():
                storage.remove(path)
            self.lock.release()
            if not storage.is_remote(self.directory):  # a bucket has no empty directories to remove
                with contextlib.suppress(OSError):
                    self.directory.rmdir()

    def _units(self) -> list[str]:
        return storage.glob(f"{self.directory}/*.json", must_match=False)


def write_run_file(path: str | Path, text: str) -> None:
    """The one way a run writes a small file into its directory: whole or not at all (`storage`)."""
    storage.write_atomic(path, text)


def _agreed(flag: bool) -> bool:
    """Process 0's `flag`, on every process."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils
    return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))
