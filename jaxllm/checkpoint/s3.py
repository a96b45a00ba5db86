"""`s3://` checkpoints: orbax 0.12 builds TensorStore specs for local paths and `gs://` only (its path
normaliser turns `s3://b/k` into `s3:/b/k`, then asks for an absolute local path). TensorStore itself has an
`s3` kvstore; `install()` teaches orbax's spec builder to use it, leaving every other path exactly as orbax
handles it. Run directories on S3 also commit by marker file (orbax's `CommitFileTemporaryPath`, as on GCS):
S3 has no directory rename.

The spec carries AWS_ENDPOINT_URL(_S3) when one is set (S3-compatible stores, moto in the tests) and the
region from AWS_REGION / AWS_DEFAULT_REGION; with AWS_ACCESS_KEY_ID in the environment the credentials are
taken from there only (TensorStore's default chain logs an error line for every missing ~/.aws file).
"""
from __future__ import annotations

import os

_installed = False


def kvstore(url: str) -> dict:
    """TensorStore's kvstore spec of `s3://bucket/key`."""
    bucket, _, key = url[len("s3://"):].partition("/")
    spec = {"driver": "s3", "bucket": bucket, "path": key}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        spec["endpoint"] = endpoint
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        spec["aws_region"] = region
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        spec["aws_credentials"] = {"type": "environment"}
    return spec


def install() -> bool:
    """Patch orbax's TensorStore spec builder for `s3://` (idempotent); False where this orbax lacks the
    functions patched (another orbax release: s3:// checkpoints are then refused with one line)."""
    global _installed
    if _installed:
        return True
    try:
        from orbax.checkpoint._src.path import gcs_utils
        from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

        normalize, use_remote, gcs_kvstore = ts_utils._normalize_path, ts_utils._use_gcs_driver, \
            gcs_utils.get_kvstore_for_gcs
    except (ImportError, AttributeError):
        return False

    def _normalize_path(path: str) -> str:
        if path.startswith("s3://"):
            return "s3://" + os.path.normpath(path[len("s3://"):])
        return normalize(path)

    def _use_gcs_driver(directory: str) -> bool:  # "a remote kvstore, not the file driver"
        return directory.startswith("s3://") or use_remote(directory)

    def get_kvstore_for_gcs(path: str) -> dict:
        return kvstore(path) if str(path).startswith("s3://") else gcs_kvstore(path)

    ts_utils._normalize_path = _normalize_path
    ts_utils._use_gcs_driver = _use_gcs_driver
    gcs_utils.get_kvstore_for_gcs = get_kvstore_for_gcs
    _installed = True
    return True


def temporary_path_class(directory):
    """orbax's TemporaryPath class for steps under `directory`: commit by marker file on S3, else None
    (orbax's default: a rename on disk, the marker on GCS)."""
    if not os.fspath(directory).startswith("s3://"):
        return None
    import orbax.checkpoint as ocp
    from orbax.checkpoint._src.path import atomicity

    from jaxllm.storage import StorageError

    if not install():
        raise StorageError(f"{os.fspath(directory)}: checkpoints on s3:// need orbax-checkpoint 0.12 "
                           f"(installed: {ocp.__version__}); use a gs:// or local run directory")
    return atomicity.CommitFileTemporaryPath


def manager_options(directory) -> dict:
    """Extra `CheckpointManagerOptions` for a run directory at `directory`."""
    cls = temporary_path_class(directory)
    return {} if cls is None else {"temporary_path_class": cls}
