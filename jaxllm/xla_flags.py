"""XLA flags for GPU runs, set before JAX starts its backend.

The latency-hiding scheduler overlaps FSDP's all-gathers and reduce-scatters with the layers' matmuls;
pipelined collectives inside the layer `scan` and large combine thresholds turn many small transfers
into a few big ones. These are the settings MaxText and NVIDIA's JAX-Toolbox recommend for transformer
training; the CPU and TPU backends ignore them. A flag already in XLA_FLAGS is left as the user set it;
JAXLLM_XLA_FLAGS=0 turns the defaults off.
"""
from __future__ import annotations

import os

GPU_FLAGS = {
    "xla_gpu_enable_latency_hiding_scheduler": "true",
    "xla_gpu_enable_highest_priority_async_stream": "true",
    "xla_gpu_enable_pipelined_all_gather": "true",
    "xla_gpu_enable_pipelined_reduce_scatter": "true",
    "xla_gpu_enable_pipelined_all_reduce": "true",
    "xla_gpu_enable_while_loop_double_buffering": "true",
    "xla_gpu_all_gather_combine_threshold_bytes": str(1 << 30),
    "xla_gpu_reduce_scatter_combine_threshold_bytes": str(1 << 30),
    "xla_gpu_all_reduce_combine_threshold_bytes": str(1 << 30),
}


def apply_gpu_flags(environ=os.environ) -> list[str]:
    """Append the GPU_FLAGS the user has not set to `environ["XLA_FLAGS"]`; returns the flags added.

    Only effective before JAX initialises its backend (the `jaxllm` command calls it first thing).
    """
    if environ.get("JAXLLM_XLA_FLAGS", "1") == "0":
        return []
    current = environ.get("XLA_FLAGS", "")
    present = {item.lstrip("-").split("=", 1)[0] for item in current.split()}
    added = [f"--{name}={value}" for name, value in GPU_FLAGS.items() if name not in present]
    if added:
        environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return added
