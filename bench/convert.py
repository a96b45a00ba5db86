"""Conversion wall time and peak memory on the real Llama-2-7B shapes (random bf16 weights).

Writes an HF-style sharded bf16 safetensors checkpoint (12.55 GiB at 32 layers), converts it
HF → jaxllm and jaxllm → HF in subprocesses, and prints wall time, peak RSS (all resident pages,
including memory-mapped file pages the kernel may drop) and peak anonymous memory (what the process
really holds), against the checkpoint size.

    python bench/convert.py                 # full 7B shapes; needs ~45 GB of free disk
    python bench/convert.py --layers 4      # quicker
    python bench/convert.py --preset demo   # seconds: a smoke run of the script itself
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def model_config(preset: str, layers: int | None):
    from jaxllm.models import get_preset

    return get_preset(preset, **({"num_layers": layers} if layers else {}))


def largest(cfg) -> tuple[int, int]:
    """(largest single HF tensor, largest layer-stacked jaxllm leaf) in bytes, bf16."""
    import jax

    from jaxllm.models import param_shapes

    leaves = jax.tree_util.tree_leaves_with_path(param_shapes(cfg))
    tensor = max(math.prod(s.shape[1:]) if str(p[0].key) == "layers" else math.prod(s.shape) for p, s in leaves)
    stacked = max(math.prod(s.shape) for p, s in leaves if str(p[0].key) == "layers")
    return 2 * tensor, 2 * stacked


def write_random_hf(directory: Path, cfg) -> int:
    import ml_dtypes

    from jaxllm.convert.core import _ShardWriter, plan_shards
    from jaxllm.convert.hf_config import hf_config_from_model
    from jaxllm.convert.mapping import tensor_maps

    maps = tensor_maps(cfg)
    dtype = np.dtype(ml_dtypes.bfloat16)
    plan = plan_shards([(m.hf_key, m.hf_shape, dtype) for m in maps], 10 * 2**30)  # HF order, ~10 GB shards
    directory.mkdir(parents=True)
    writer = _ShardWriter(directory, plan)
    rng = np.random.default_rng(0)
    for m in maps:
        n = int(np.prod(m.hf_shape))
        # small normal values, as bf16 bit patterns (no NaN/Inf)
        values = (rng.standard_normal(min(n, 1 << 24), dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)
        writer.write(m.hf_key, np.resize(values, n).reshape(m.hf_shape))
    (directory / "model.safetensors.index.json").write_text(json.dumps(writer.index()))
    hf_cfg, _ = hf_config_from_model(cfg, "bfloat16")
    (directory / "config.json").write_text(json.dumps(hf_cfg))
    return writer.index()["metadata"]["total_size"]


def measure(cmd: list[str]) -> tuple[float, float, float]:
    """(wall seconds, peak RSS GB, peak anonymous GB) of a subprocess, polled from /proc."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = {"rss": 0, "anon": 0}

    def poll():
        while proc.poll() is None:
            try:
                status = Path(f"/proc/{proc.pid}/status").read_text()
            except OSError:
                break
            for line in status.splitlines():
                if line.startswith("VmRSS:"):
                    peak["rss"] = max(peak["rss"], int(line.split()[1]))
                elif line.startswith("RssAnon:"):
                    peak["anon"] = max(peak["anon"], int(line.split()[1]))
            time.sleep(0.05)

    thread = threading.Thread(target=poll)
    thread.start()
    out, _ = proc.communicate()
    thread.join()
    if proc.returncode:
        raise SystemExit(f"command failed: {' '.join(cmd)}\n{out}")
    return time.perf_counter() - start, peak["rss"] / 2**20, peak["anon"] / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama2-7b", help="model shapes (default: Llama-2-7B)")
    parser.add_argument("--layers", type=int, default=None, help="override the preset's depth")
    parser.add_argument("--tmp", default=tempfile.gettempdir())
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="jaxllm-bench-convert-", dir=args.tmp))
    from jaxllm.models import count_params

    cfg = model_config(args.preset, args.layers)
    need = 3.3 * 2 * count_params(cfg)  # bf16 source, orbax copy, exported copy, slack
    free = shutil.disk_usage(work).free
    if free < need:
        raise SystemExit(f"{work}: {free / 1e9:.1f} GB free, about {need / 1e9:.1f} GB needed")
    try:
        t0 = time.perf_counter()
        total = write_random_hf(work / "hf", cfg)
        print(f"wrote random {args.preset}-shaped checkpoint ({cfg.num_layers} layers, {total / 2**30:.2f} GiB bf16) "
              f"in {time.perf_counter() - t0:.0f}s")
        jaxllm = [sys.executable, "-m", "jaxllm.cli", "convert"]
        rows = [("hf → jaxllm", *measure(jaxllm + ["--from", "hf", "--to", "jaxllm", str(work / "hf"),
                                                   str(work / "jx")])),
                ("jaxllm → hf", *measure(jaxllm + ["--from", "jaxllm", "--to", "hf", str(work / "jx"),
                                                   str(work / "hf2")]))]
        size = total / 2**30
        print(f"\n{'direction':<14}{'wall s':>9}{'peak RSS GiB':>14}{'peak anon GiB':>15}{'ckpt GiB':>10}"
              f"{'anon/ckpt':>11}")
        for name, wall, rss, anon in rows:
            print(f"{name:<14}{wall:>9.1f}{rss:>14.2f}{anon:>15.2f}{size:>10.2f}{anon / size:>11.2f}")
        tensor, stacked = largest(cfg)
        print(f"\nlargest single tensor {tensor / 2**30:.2f} GiB; largest layer-stacked leaf {stacked / 2**30:.2f} GiB")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
