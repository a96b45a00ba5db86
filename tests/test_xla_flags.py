"""The GPU XLA flags: added unless the user set them, and every one known to the installed XLA."""
import os
import subprocess
import sys

from jaxllm.xla_flags import GPU_FLAGS, apply_gpu_flags


def test_user_flags_win_and_the_rest_are_added():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_gpu_enable_latency_hiding_scheduler=false"}
    added = apply_gpu_flags(env)
    assert "--xla_gpu_enable_latency_hiding_scheduler=false" in env["XLA_FLAGS"]
    assert env["XLA_FLAGS"].count("xla_gpu_enable_latency_hiding_scheduler") == 1
    assert env["XLA_FLAGS"].startswith("--xla_force_host_platform_device_count=8")
    assert len(added) == len(GPU_FLAGS) - 1
    assert apply_gpu_flags(env) == []  # idempotent
    assert apply_gpu_flags({"JAXLLM_XLA_FLAGS": "0"}) == []


def test_every_flag_is_known_to_xla():
    """XLA aborts on an unknown flag, and it registers the GPU flags in every build, CPU included."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    apply_gpu_flags(env)
    run = subprocess.run([sys.executable, "-c", "import jax.numpy as jnp; print(jnp.ones(3).sum())"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "3.0" in run.stdout, run.stderr[-2000:]
    env["XLA_FLAGS"] += " --xla_gpu_no_such_flag=true"  # the check itself can fail
    assert subprocess.run([sys.executable, "-c", "import jax.numpy as jnp; jnp.ones(3).sum()"], env=env,
                          capture_output=True, timeout=120).returncode != 0
