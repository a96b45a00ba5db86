"""A `jax.profiler` trace of a window of steps, written where TensorBoard's profile tab looks for it.

`train.profile=START:STOP` (PPO: `ppo.profile`, in iterations) traces the steps after step START up to and
including step STOP (counted as in metrics.jsonl) into `RUN/tb/plugins/profile/<timestamp>/`: `tensorboard --logdir RUN/tb` lists it under
Profile, and the `*.trace.json.gz` beside it opens in Perfetto. `generate` and `serve` take `--profile DIR`.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import jax

from jaxllm.train.config import parse_window  # noqa: F401  (the window's syntax is checked with the config)


def _start(log_dir: str | os.PathLike) -> None:
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    jax.profiler.start_trace(str(log_dir), create_perfetto_trace=True)


class ProfileWindow:
    """Call `step(done)` with the number of steps done before each step runs and once after the last; the
    trace runs while START <= done < STOP. `sync` (e.g. the step's metrics) is waited on before the trace
    stops, so the window holds the device work of its steps, not only their dispatch."""

    def __init__(self, window: tuple[int, int] | None, log_dir: str | os.PathLike):
        self.window, self.log_dir, self.active = window, Path(log_dir), False

    def step(self, done: int, sync=None) -> None:
        if self.window is None:
            return
        start, stop = self.window
        if not self.active and start <= done < stop:
            _start(self.log_dir)
            self.active = True
        elif self.active and done >= stop:
            self.close(sync)

    def close(self, sync=None) -> None:
        if self.active:
            if sync is not None:
                jax.block_until_ready(sync)
            jax.profiler.stop_trace()
            self.active = False


@contextlib.contextmanager
def trace(log_dir: str | os.PathLike | None):
    """The whole block traced into `log_dir` (nothing when None): `generate` / `serve --profile DIR`."""
    if log_dir is None:
        yield
        return
    _start(log_dir)
    try:
        yield
    finally:
        jax.profiler.stop_trace()


def trace_files(log_dir: str | os.PathLike) -> list[Path]:
    """The trace files written under `log_dir` (xplane protos and Perfetto JSON), oldest run first."""
    return sorted(Path(log_dir).glob("plugins/profile/*/*"))
