"""Launch one `jaxllm` command as several JAX processes on this machine, the way a cluster would.

    results = launch(["sft", "recipe.yaml"], processes=2, devices=4)
    assert all(r.returncode == 0 for r in results), report(results)

Each process gets JAX_COORDINATOR_ADDRESS (127.0.0.1 and a free port), JAX_NUM_PROCESSES, JAX_PROCESS_ID
and its own count of fake CPU devices (XLA_FLAGS); cross-process collectives go through gloo, JAX's
default on CPU. The helper collects every process's output and exit code, and kills them all when one
fails (the rest would wait in a collective until the coordinator's timeout) or the time runs out.
"""
from __future__ import annotations

import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass
class Result:
    process: int
    returncode: int | None      # None: killed on timeout or after another process failed
    stdout: str
    stderr: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(process: int, processes: int, devices: int, port: int, extra: dict | None = None) -> dict:
    """The environment of process `process` of `processes`, each with `devices` CPU devices."""
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", "")).split()
    env.update({"XLA_FLAGS": " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"]),
                "JAX_PLATFORMS": "cpu", "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                "JAX_NUM_PROCESSES": str(processes), "JAX_PROCESS_ID": str(process),
                "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p),
                "PYTHONUNBUFFERED": "1"})
    env.update(extra or {})
    return env


# Errors after which a process does not exit by itself (its peers wait in a collective and it waits for them
# in jax.distributed's shutdown): seen in a process's stderr, every process is killed at once.
FATAL = ("Gloo context initialization failed",)


def _tail(file, size: int = 65536) -> str:
    """The end of a file a child process is writing, read without moving the offset they share."""
    end = os.fstat(file.fileno()).st_size
    return os.pread(file.fileno(), size, max(0, end - size)).decode("utf-8", "replace")


def launch(argv: list[str], *, processes: int = 2, devices: int = 4, timeout: float = 300,
           env: dict | list[dict] | None = None, cwd: str | Path | list | None = None, grace: float = 20,
           kill_when=None) -> list[Result]:
    """Run `jaxllm ARGV` as `processes` processes of `devices` devices each; their results in process order.
    `env` (extra variables) and `cwd` may be lists, one per process (hosts that share no disk).

    When a process exits with an error, the others get `grace` seconds to finish before they are killed;
    all are killed after `timeout` seconds, at once when a process reports a FATAL error, or at once
    (SIGKILL, a lost node) when `kill_when()` is true."""
    port = free_port()
    logs, procs = [], []
    try:
        envs = env if isinstance(env, list) else [env] * processes
        cwds = cwd if isinstance(cwd, list) else [cwd] * processes
        for i in range(processes):
            out = tempfile.TemporaryFile(mode="w+", encoding="utf-8")
            err = tempfile.TemporaryFile(mode="w+", encoding="utf-8")
            logs.append((out, err))
            procs.append(subprocess.Popen([sys.executable, "-m", "jaxllm.cli", *argv], stdout=out, stderr=err,
                                          env=process_env(i, processes, devices, port, envs[i]), cwd=cwds[i],
                                          start_new_session=True))
        deadline = time.monotonic() + timeout
        polls = 0
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if kill_when is not None and kill_when():
                break
            if any(p.poll() not in (None, 0) for p in procs):
                deadline = min(deadline, time.monotonic() + grace)
            polls += 1
            if polls % 20 == 0 and any(f in _tail(err) for _, err in logs for f in FATAL):
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    results = []
    for i, (p, (out, err)) in enumerate(zip(procs, logs)):
        out.seek(0)
        err.seek(0)
        code = p.returncode if p.returncode is not None and p.returncode >= 0 else None
        results.append(Result(i, code, out.read(), err.read()))
        out.close()
        err.close()
    return results


def report(results: list[Result], tail: int = 3000) -> str:
    """Every process's exit code and the end of its output, for an assertion message."""
    return "\n".join(f"--- process {r.process}: exit {r.returncode}\n{r.stdout[-tail:]}\n{r.stderr[-tail:]}"
                     for r in results)


def ok(results: list[Result]) -> bool:
    return all(r.returncode == 0 for r in results)
