"""The run directory: RUN/config.yaml (the resolved config), RUN/checkpoints, RUN/tokenizer.model,
RUN/metrics.jsonl, RUN/tb/, RUN/loss.png, and RUN/lock while a process trains in it.

A directory is never reused by a run with another config, and never written by two runs at once: `claim`
checks the config, then creates the directory, takes the lock and writes the config, in that order, so a
command that fails its checks leaves nothing behind.
"""
from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

import jax
import yaml

from jaxllm import checkpoint as jckpt
from jaxllm import storage
from jaxllm.config import ConfigError, ModelConfig
from jaxllm.train.config import RunConfig, config_differences

LOCK = "lock"
HEARTBEAT_S = 30.0        # the holder touches RUN/lock this often
STALE_AFTER_S = 300.0     # a lock of another host untouched this long belongs to a dead run


class RunDirError(ConfigError):
    """The run directory belongs to another run."""


class RunDirLocked(RunDirError):
    """Another process is training in the run directory."""


def check(run_dir: str | Path, config: RunConfig) -> Path:
    """RunDirError unless RUN is new or holds this run (RUN/config.yaml describes the same run; cadence,
    display, mesh or run length may differ). Creates nothing."""
    storage.check_bucket(run_dir)
    run_dir = storage.path(run_dir)
    path = run_dir / "config.yaml"
    new = config.to_dict()
    if storage.exists(path):
        try:
            saved = yaml.safe_load(storage.read_text(path)) or {}
        except yaml.YAMLError as err:
            raise RunDirError(f"{path}: unreadable ({err}); move it away to reuse {run_dir}") from None
        if saved.get("stage_name") is None:  # written before runs recorded their stage
            saved["stage_name"] = new.get("stage_name")
        if saved.get("stage_name") != new.get("stage_name"):
            raise RunDirError(f"run directory {run_dir} holds a `{_command(saved['stage_name'])}` run, not a "
                              f"`{_command(new.get('stage_name'))}` one; choose another run_dir=…")
        diffs = config_differences(saved, new)
        if diffs:
            shown = "; ".join(diffs[:6]) + (f"; … ({len(diffs)} differences)" if len(diffs) > 6 else "")
            hint = ""
            if any(d.startswith("optimizer.decay_steps:") for d in diffs):
                hint = (f" To train longer on the same schedule, keep optimizer.decay_steps="
                        f"{saved.get('optimizer', {}).get('decay_steps')}.")
            raise RunDirError(f"run directory {run_dir} holds a run with a different config ({shown}). "
                              f"Choose another run_dir=… or remove {run_dir} to start over.{hint}")
    elif has_checkpoints(run_dir):
        raise RunDirError(f"run directory {run_dir} has checkpoints but no config.yaml; refusing to train "
                          f"into it (choose another run_dir=…)")
    return run_dir


def _command(stage_name) -> str:
    return {"pretrain": "jaxllm train", None: "jaxllm train"}.get(stage_name, f"jaxllm {stage_name}")


def has_checkpoints(run_dir: str | Path) -> bool:
    """Whether RUN/checkpoints holds a saved step (a resumed run needs no starting checkpoint); a step whose
    save never finished (in a bucket: no commit marker) does not count."""
    directory = storage.path(run_dir) / "checkpoints"
    return storage.is_dir(directory) and any(name.isdigit() and jckpt.step_finished(directory / name)
                                             for name in storage.listdir(directory))


def claim(run_dir: str | Path, config: RunConfig, log=print) -> "RunLock":
    """Check RUN (see `check`), create it, lock it for this run and write the resolved config. Process 0
    holds the lock for every process of a multi-host run; the others learn whether it was taken."""
    run_dir = check(run_dir, config)
    held = lock(run_dir, log=log)
    if jax.process_index() == 0:
        storage.write_atomic(run_dir / "config.yaml", config.to_yaml())
    return held


def lock(run_dir: str | Path, log=print) -> "RunLock":
    """Create RUN if needed and lock it for this run until `release()` or the end of the process
    (RunDirLocked, one line naming the holder, when another run holds it). Process 0 of a multi-host run
    takes the lock for all; every process learns the outcome, so none trains alone."""
    run_dir, held, error = storage.path(run_dir), None, None
    if jax.process_index() == 0:
        storage.makedirs(run_dir)
        try:
            held = RunLock.acquire(run_dir, log=log)
        except RunDirLocked as err:
            error = err
    if not _agreed(error is None):
        raise error or RunDirLocked(f"run directory {run_dir} is in use by another run (see process 0)")
    return held or RunLock(run_dir, token=None)


def prepare(run_dir: str | Path, config: RunConfig) -> Path:
    """`claim` without keeping the lock (for callers that only record a run's config)."""
    claim(run_dir, config).release()
    return storage.path(run_dir)


def _agreed(flag: bool) -> bool:
    if jax.process_count() == 1:
        return flag
    import numpy as np
    from jax.experimental import multihost_utils
    return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


def copy_tokenizer(run_dir: str | Path, tokenizer_path: str | Path) -> Path:
    target = storage.path(run_dir) / "tokenizer.model"
    if jax.process_index() == 0 and not storage.same(tokenizer_path, target):
        storage.copy(tokenizer_path, target)
    return target


def copy_model_files(run_dir: str | Path, tokenizer_path: str | Path | None, init_from: str | Path | None) -> None:
    """The starting model's files besides weights: the tokenizer's HF files (added tokens, add_bos_token)
    and the HF remote code of `init_from`, so that an export of the run is the model users loaded."""
    if jax.process_index() == 0:
        from jaxllm.checkpoint.companions import copy_model_files as copy

        copy(run_dir, tokenizer_path, init_from)


# ----------------------------------------------------------------------------------------- the lock

def _start_ticks(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid from its holder."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, ticks: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    now = _start_ticks(pid)
    return ticks is None or now is None or now == ticks


class RunLock:
    """RUN/lock: {"host", "pid", "start", "token", "since", "command"}, created exclusively, touched every
    HEARTBEAT_S seconds while held, removed on release (and at exit).

    A lock whose holder is dead (same host: no such process, or the pid now belongs to another program) or
    silent (another host: untouched for STALE_AFTER_S seconds) is taken over, with one line saying so."""

    def __init__(self, run_dir: Path, token: str | None):
        self.path, self.token = storage.path(run_dir) / LOCK, token
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    @classmethod
    def acquire(cls, run_dir: Path, log=print) -> "RunLock":
        path = storage.path(run_dir) / LOCK
        token = uuid.uuid4().hex
        info = {"host": socket.gethostname(), "pid": os.getpid(), "start": _start_ticks(os.getpid()),
                "token": token, "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:200]}
        for _ in range(5):
            # create-only: O_EXCL on disk, ifGenerationMatch=0 on GCS, If-None-Match: * on S3
            if not storage.create_exclusive(path, json.dumps(info)):
                holder = _read(path)
                if holder is None:
                    time.sleep(0.2)  # being written right now
                    holder = _read(path)
                reason = _stale(path, holder)
                if holder is not None and holder.get("pid") == os.getpid() and \
                        holder.get("host") == info["host"]:
                    reason = "a finished run of this process"  # e.g. train() called again in a notebook
                if reason is None:
                    raise RunDirLocked(_held_message(run_dir, holder)) from None
                if _take_away(path, holder):
                    if not reason.startswith("a finished run of this process"):
                        log(f"run directory {run_dir}: taking over the lock of {_describe(holder)} ({reason})")
                continue
            lock = cls(run_dir, token)
            lock._start_heartbeat()
            atexit.register(lock.release)
            return lock
        raise RunDirLocked(f"run directory {run_dir}: could not take {path} (other processes keep taking it)")

    def _start_heartbeat(self) -> None:
        def beat():
            while not self._stop.wait(HEARTBEAT_S):
                try:
                    storage.touch(self.path)
                except OSError:
                    return
        self._beat = threading.Thread(target=beat, name="jaxllm-run-lock", daemon=True)
        self._beat.start()

    def release(self) -> None:
        """Remove the lock if it is still ours (idempotent)."""
        self._stop.set()
        if self.token is None:
            return
        atexit.unregister(self.release)
        holder = _read(self.path)
        if holder is not None and holder.get("token") == self.token:
            storage.remove(self.path)
        self.token = None


def _read(path: Path) -> dict | None:
    try:
        value = json.loads(storage.read_text(path))
        return value if isinstance(value, dict) else None
    except (OSError, ValueError):
        return None


def _stale(path: Path, holder: dict | None) -> str | None:
    """Why the lock at `path` no longer belongs to a live run, or None when it does."""
    try:
        age = time.time() - storage.mtime(path)
    except FileNotFoundError:
        return "released meanwhile"
    if holder is None:
        return "unreadable lock file" if age > 5 else None
    if holder.get("host") == socket.gethostname():
        if not _alive(int(holder.get("pid", -1)), holder.get("start")):
            return "the process no longer runs"
        return None
    if age > STALE_AFTER_S:
        return f"no heartbeat for {age / 60:.0f} min"
    return None


def _take_away(path: Path, holder: dict | None) -> bool:
    """Move a stale lock aside, only if it is still the one judged stale (another process may have taken
    it over first); True when the path is free to be created."""
    aside = path.with_name(f"{LOCK}.stale-{uuid.uuid4().hex[:8]}")
    try:
        storage.rename(path, aside)
    except FileNotFoundError:
        return True
    moved = _read(aside)
    if holder is not None and (moved or {}).get("token") != holder.get("token"):
        # a live lock was moved: put it back unless someone took the path meanwhile
        storage.create_exclusive(path, storage.read_bytes(aside))
        storage.remove(aside)
        return False
    storage.remove(aside)
    return True


def _describe(holder: dict | None) -> str:
    if holder is None:
        return "an unknown process"
    return f"pid {holder.get('pid')} on {holder.get('host')}"


def _held_message(run_dir, holder: dict | None) -> str:
    what = f" (`{holder['command']}`)" if holder and holder.get("command") else ""
    since = f" since {holder['since']}" if holder and holder.get("since") else ""
    return (f"run directory {run_dir} is in use by {_describe(holder)}{what}{since}; wait for it to finish, "
            f"stop it, or choose another run_dir=…")


# ----------------------------------------------------------------------------------------- hints

DEFAULT_RECIPES = {"train": "demo", "sft": "sft-demo", "dpo": "dpo-demo", "rm": "rm-demo", "ppo": "ppo-demo",
                   "rejection-sample": "rejection-demo"}


def producer_hint(path: str | Path) -> str:
    """"; it is written by `jaxllm sft`: run that first" when a shipped recipe trains into `path` (the demos
    chain: train → sft → dpo / rm → ppo), else ""."""
    from jaxllm.train.config import CONFIGS_DIR

    if storage.is_remote(path):  # the shipped recipes train into local directories
        return ""
    target = Path(path).resolve()
    for recipe in sorted(CONFIGS_DIR.glob("*.yaml")):
        try:
            data = yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError):
            continue
        run = data.get("run_dir") if isinstance(data, dict) else None
        if run and Path(run).resolve() == target:
            words = recipe.stem.split("-")
            command = next((c for c in ("sft", "dpo", "rm", "ppo", "rejection-sample")
                            if c.split("-")[0] in words), "train")
            shown = f"jaxllm {command}" + ("" if DEFAULT_RECIPES[command] == recipe.stem else f" {recipe.stem}")
            return f"; it is written by `{shown}`: run that first"
    return ""


def check_init_from(path: str, model_config: ModelConfig) -> None:
    """One-line errors, before a run directory is claimed, unless `path` is a checkpoint with a saved step
    of a language model whose parameters fit `model_config`; a missing demo checkpoint names the command
    that writes it."""
    from jaxllm.models import param_shapes

    label = f"init_from {path}"
    storage.check_bucket(path)  # no such bucket, no access: one line naming it
    if not storage.exists(path):
        raise jckpt.CheckpointError(f"{label}: no such checkpoint{producer_hint(path)}")
    directory = jckpt.resolve(path)
    if storage.is_file(storage.path(path) / "config.yaml") and not jckpt.is_checkpoint(directory):
        raise jckpt.CheckpointError(f"{label}: its run has not saved a checkpoint yet{producer_hint(path)}")
    source = jckpt.read_model_config(directory)
    try:
        step = jckpt.latest_step(directory)
    except jckpt.CheckpointError as err:
        raise jckpt.CheckpointError(f"{label}: {err}{producer_hint(path)}") from None
    jckpt.require_kind(directory, step, "lm", label=label)
    ours, theirs = param_shapes(model_config), param_shapes(source)
    same = jax.tree.structure(ours) == jax.tree.structure(theirs) and all(
        a.shape == b.shape for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)))
    if not same:
        fields = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                  "tie_embeddings", "head")
        diff = [f"{f} {getattr(source, f)} vs {getattr(model_config, f)}" for f in fields
                if getattr(source, f) != getattr(model_config, f)]
        raise ConfigError(f"{label} holds {source.name} parameters that do not fit the run's model "
                          f"{model_config.name} ({', '.join(diff) or 'different tree'})")
