"""Real object-store servers for the tests: `gcp-storage-emulator` (GCS's JSON API) and `moto` (S3), each
started once per test session on a free 127.0.0.1 port, checked to answer before any test uses it, and
stopped at the end.

The `gcs` fixture sets STORAGE_EMULATOR_HOST (gcsfs, google-cloud-storage) and TENSORSTORE_GCS_HTTP_URL
(tensorstore, so orbax writes `gs://` arrays itself); `s3` sets AWS_ENDPOINT_URL and dummy credentials (s3fs,
botocore). CLI subprocesses inherit them. Each test gets a fresh bucket (`gs://jaxllm-test-<n>`). Only a
missing package skips; a server that does not start is a failure.
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

_counter = itertools.count()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(argv: list[str], url: str, probe: str, name: str):
    # the servers log every request: to a file, never a pipe (a full pipe would block them)
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"{name} exited ({proc.returncode}): {log.read().decode()[-500:]}")
        try:
            urllib.request.urlopen(url + probe, timeout=1).read()
            return proc
        except Exception:  # noqa: BLE001 - not listening yet
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{name} did not answer on {url} within 30 s")


def _stop(proc) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def _need(module: str, executable: str) -> str:
    pytest.importorskip(module, reason=f"{module} is not installed (pip install -e '.[test,cloud]')")
    path = shutil.which(executable) or os.path.join(os.path.dirname(sys.executable), executable)
    if not os.path.exists(path):
        pytest.skip(f"{executable} is not installed (pip install -e '.[test]')")
    return path


@pytest.fixture(scope="session")
def gcs_server():
    """The GCS emulator's URL, with the environment pointing gcsfs and tensorstore at it."""
    pytest.importorskip("gcsfs", reason="gcsfs is not installed (pip install -e '.[cloud]')")
    exe = _need("gcp_storage_emulator", "gcp-storage-emulator")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _start([exe, "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory"], url,
                  "/storage/v1/b?project=test", "gcp-storage-emulator")
    names = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "FSSPEC_GCS_TOKEN", "NO_GCE_CHECK",
             "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")
    saved = {k: os.environ.get(k) for k in names}
    # anonymous: no search for Google credentials (the metadata server's timeouts)
    os.environ.update(STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url, FSSPEC_GCS_TOKEN="anon",
                      NO_GCE_CHECK="true", GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false")
    try:
        yield url
    finally:
        _stop(proc)
        _restore(saved)


@pytest.fixture(scope="session")
def s3_server():
    """The moto server's URL, with AWS_ENDPOINT_URL and dummy credentials set."""
    pytest.importorskip("s3fs", reason="s3fs is not installed (pip install -e '.[cloud]')")
    exe = _need("moto", "moto_server")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _start([exe, "-H", "127.0.0.1", "-p", str(port)], url, "/", "moto_server")
    names = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    saved = {k: os.environ.get(k) for k in names}
    os.environ.update(AWS_ENDPOINT_URL=url, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1")
    try:
        yield url
    finally:
        _stop(proc)
        _restore(saved)


def _restore(saved: dict) -> None:
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _new_bucket(protocol: str) -> str:
    import fsspec

    name = f"jaxllm-test-{os.getpid()}-{next(_counter)}"
    fs = fsspec.filesystem(protocol, skip_instance_cache=True)
    fs.mkdir(name)
    fsspec.filesystem(protocol).invalidate_cache()
    return f"{protocol}://{name}"


@pytest.fixture
def gcs(gcs_server):
    """A fresh, empty bucket on the GCS emulator: "gs://jaxllm-test-…"."""
    return _new_bucket("gs")


@pytest.fixture
def s3(s3_server):
    """A fresh, empty bucket on the moto server: "s3://jaxllm-test-…"."""
    return _new_bucket("s3")


READ_ONLY, SEALED = "jaxllm-read-only", "jaxllm-sealed"


@pytest.fixture
def s3_denied(monkeypatch):
    """A moto server of its own that enforces IAM: buckets READ_ONLY (objects may be read, not written or
    deleted) and SEALED (nothing may be read), each holding `ckpt/model.json`; the environment holds the
    keys of the user those policies bind. Yields the server's URL."""
    boto3 = pytest.importorskip("boto3")
    exe = _need("moto", "moto_server")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _start([exe, "-H", "127.0.0.1", "-p", str(port)], url, "/moto-api/", "moto_server")
    try:
        admin = dict(endpoint_url=url, aws_access_key_id="testing", aws_secret_access_key="testing",
                     region_name="us-east-1")
        s3 = boto3.client("s3", **admin)
        for name in (READ_ONLY, SEALED):
            s3.create_bucket(Bucket=name)
            s3.put_object(Bucket=name, Key="ckpt/model.json", Body=b"{}")
        iam = boto3.client("iam", **admin)
        iam.create_user(UserName="reader")
        deny = [{"Effect": "Deny", "Action": ["s3:PutObject", "s3:DeleteObject"], "Resource": f"arn:aws:s3:::{READ_ONLY}/*"},
                {"Effect": "Deny", "Action": ["s3:GetObject"], "Resource": f"arn:aws:s3:::{SEALED}/*"}]
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}, *deny]}
        iam.put_user_policy(UserName="reader", PolicyName="limits", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        # from here on the server checks every request's signature and the user's policies
        urllib.request.urlopen(urllib.request.Request(f"{url}/moto-api/reset-auth", data=b"0", method="POST",
                                                      headers={"Content-Type": "text/plain"})).read()
        monkeypatch.setenv("AWS_ENDPOINT_URL", url)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        _forget_s3_clients()
        yield url
    finally:
        _stop(proc)
        _forget_s3_clients()


def _forget_s3_clients() -> None:
    # fsspec caches one S3FileSystem per argument set, and etils.epath one filesystem per scheme: one made
    # for another endpoint or other keys must not be reused
    import s3fs
    from etils.epath import backend

    s3fs.S3FileSystem.clear_instance_cache()
    backend.fsspec_backend._get_filesystem.cache_clear()
