"""Test-suite set-up: 8 fake CPU devices so sharding is always exercised."""
import os
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One persistent XLA cache for every worker and every CLI subprocess of the run: the suite compiles the same
# tiny programs many times (test_model.py: 111 s without, 77 s from a cold cache, 30 s warm).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"jaxllm-test-xla-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
# Notebooks and IPython must not write into the user's home directory.
_scratch = tempfile.mkdtemp(prefix="jaxllm-test-home-")
for var in ("JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR", "IPYTHONDIR", "MPLCONFIGDIR"):
    os.environ.setdefault(var, os.path.join(_scratch, var.lower()))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from storage_servers import gcs, gcs_server, s3, s3_denied, s3_server  # noqa: E402,F401 - fixtures
