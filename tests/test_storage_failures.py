"""Buckets that fail at run time, with real clients and servers (no client library mocked):

- the network cut in the middle of a checkpoint save (a TCP proxy between `jaxllm train` and the GCS
  emulator drops every connection once the step's objects are being written): one line naming the step, the
  step never marked finished, and the rerun resumes from the step before, bit-identically;
- no credentials for gs:// or s3://: one line saying how to supply them, exit 2, nothing created, and not
  one connection attempted (an audit hook in the command's process records and blocks every socket that
  would leave 127.0.0.1).
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxllm import cli, storage
from jaxllm.checkpoint import latest_step, load_params
from cut_proxy import CutProxy
from storage_servers import _free_port
from test_storage_train import QUIET, recipe

ROOT = str(Path(__file__).resolve().parent.parent)


def jaxllm_train(config, env, timeout=600):
    """`jaxllm train CONFIG` in a process of its own; one that outlives `timeout` is stopped with SIGABRT (its
    threads' stacks: faulthandler) and fails the test."""
    command = [sys.executable, "-X", "faulthandler", "-m", "jaxllm.cli", "train", config, *QUIET]
    proc = subprocess.Popen(command, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        out, err = proc.communicate()
        raise AssertionError(f"jaxllm train still ran after {timeout} s:\n{err[-12000:]}") from None
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


@pytest.mark.slow  # ~4 min: the cut run waits out the clients' bounded retries (~60 s) on a 2-core box
def test_a_network_cut_mid_save_stops_in_one_line_and_the_rerun_resumes_from_the_step_before(
        tmp_path, gcs, gcs_server, capsys):
    straight, cut = f"{gcs}/runs/straight", f"{gcs}/runs/cut"
    assert cli.main(["train", recipe(tmp_path, "a", straight, 4), *QUIET]) == 0
    # the 200th request for an object of step 4 (of ~500: a third of its arrays are written) cuts the network
    proxy = CutProxy(gcs_server, r"checkpoints(/|%2F)4(/|%2F)", after=200)
    env = {**os.environ, "PYTHONPATH": ROOT, "STORAGE_EMULATOR_HOST": proxy.url, "TENSORSTORE_GCS_HTTP_URL": proxy.url}
    start = time.monotonic()
    failed = jaxllm_train(recipe(tmp_path, "b", cut, 4), env)
    took = time.monotonic() - start
    assert proxy.cut.is_set()
    assert failed.returncode == 2, failed.stderr[-3000:]
    assert "Traceback" not in failed.stderr, failed.stderr[-3000:]
    errors = [line for line in failed.stderr.splitlines() if "error" in line.lower() and "credentials" not in line]
    assert errors == [f"jaxllm train: error: {cut}/checkpoints/4: the checkpoint was not saved (the storage "
                      f"server cannot be reached (connection refused)); the step is not marked finished, so "
                      f"rerunning the command resumes from step 2"], failed.stderr[-3000:]
    assert took < 300, took  # retries are bounded (gcsfs ~30 s per request, TensorStore as much)
    # half written: objects of step 4 are in the bucket, its commit marker is not, and no reader lists it
    written = storage.glob(f"{cut}/checkpoints/4/**", must_match=False)
    assert any("/params/" in name for name in written) and f"{cut}/checkpoints/4/_CHECKPOINT_METADATA" in written
    assert f"{cut}/checkpoints/4/commit_success.txt" not in written
    assert latest_step(storage.path(f"{cut}/checkpoints")) == 2
    # through a healthy connection the same command resumes from step 2 and ends where the straight run did
    capsys.readouterr()
    assert cli.main(["train", recipe(tmp_path, "b", cut, 4), *QUIET]) == 0
    out = capsys.readouterr().out
    assert f"removed unfinished checkpoint files in {cut}/checkpoints: 4 (an interrupted save)" in out, out
    assert f"resumed {cut} at step 2" in out, out
    steps = [json.loads(line)["step"] for line in storage.read_text(f"{cut}/metrics.jsonl").splitlines()]
    assert steps == [1, 2, 3, 4]
    assert storage.exists(f"{cut}/checkpoints/4/commit_success.txt")
    a, _ = load_params(f"{straight}/checkpoints")
    b, _ = load_params(f"{cut}/checkpoints")
    assert all(jax.tree.leaves(jax.tree.map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), a, b)))


# ----------------------------------------------------------------------------------------- no credentials

# Run in the command's own process: every connect and name lookup is recorded, and any that would leave
# 127.0.0.1 is refused before it happens.
_RUNNER = r'''
import contextlib, io, json, os, sys
LOOPBACK = ("127.0.0.1", "localhost", "::1", None)
attempts = []
def audit(event, args):
    if event == "socket.connect" and isinstance(args[1], tuple) or event == "socket.getaddrinfo":
        host = args[1][0] if event == "socket.connect" else args[0]
        host = host.decode() if isinstance(host, bytes) else host
        attempts.append(f"{event} {host}")
        if host not in LOOPBACK:
            raise PermissionError(f"the test lets nothing leave 127.0.0.1 ({host})")
sys.addaudithook(audit)
from jaxllm import cli
results = []
for case in json.loads(sys.argv[1]):
    os.environ.update(case["env"])
    os.makedirs(case["work"])
    os.chdir(case["work"])
    err, before = io.StringIO(), len(attempts)
    with contextlib.redirect_stderr(err):
        code = cli.main(case["argv"])
    results.append({"code": code, "err": err.getvalue().strip(), "left": os.listdir(case["work"]),
                    "attempts": attempts[before:]})
    for key in case["env"]:
        os.environ.pop(key)
print(json.dumps(results))
'''

GCS_HOW = "set GOOGLE_APPLICATION_CREDENTIALS=/path/key.json or run `gcloud auth application-default login`"
S3_HOW = "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or write ~/.aws/credentials"


def no_credentials_env(tmp_path, s3_url):
    """The environment of a machine without cloud credentials, where every place a client would look for them
    is empty or on 127.0.0.1 with nothing listening."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "GOOGLE_", "GCE_", "CLOUDSDK_", "STORAGE_EMULATOR_", "TENSORSTORE_GCS_",
                                "FSSPEC_", "BOTO_"))}
    closed = f"127.0.0.1:{_free_port()}"
    (tmp_path / "home").mkdir()
    missing = str(tmp_path / "missing")
    env.update(PYTHONPATH=ROOT, HOME=str(tmp_path / "home"), CLOUDSDK_CONFIG=missing, NO_GCE_CHECK="true",
               GCE_METADATA_HOST=closed, GCE_METADATA_IP=closed, GCE_METADATA_ROOT=closed,
               AWS_EC2_METADATA_DISABLED="true", AWS_SHARED_CREDENTIALS_FILE=missing, AWS_CONFIG_FILE=missing,
               BOTO_CONFIG=missing, AWS_ENDPOINT_URL=s3_url, AWS_DEFAULT_REGION="us-east-1",
               GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false")
    return env


def test_no_credentials_for_a_bucket_run_dir_or_init_from(tmp_path, s3, s3_server):
    config = recipe(tmp_path, "r", tmp_path / "unused", 2)
    local = str(tmp_path / "local-run")
    key = str(tmp_path / "key.json")  # named by GOOGLE_APPLICATION_CREDENTIALS, absent
    cases = [  # (argv overrides, extra environment, the line)
        ([f"run_dir=gs://jaxllm-no-creds/runs/x"], {},
         f"gs://jaxllm-no-creds/runs/x: no Google Cloud credentials found: {GCS_HOW}"),
        ([f"run_dir={local}", "init_from=gs://jaxllm-no-creds/ckpt"], {},
         f"gs://jaxllm-no-creds/ckpt: no Google Cloud credentials found: {GCS_HOW}"),
        ([f"run_dir=gs://jaxllm-no-creds/runs/x"], {"GOOGLE_APPLICATION_CREDENTIALS": key},
         f"gs://jaxllm-no-creds/runs/x: no Google Cloud credentials: GOOGLE_APPLICATION_CREDENTIALS names {key}, "
         f"which does not exist"),
        ([f"run_dir={s3}/runs/x"], {}, f"{s3}/runs/x: no AWS credentials found: {S3_HOW}"),
        ([f"run_dir={local}", f"init_from={s3}/ckpt"], {}, f"{s3}/ckpt: no AWS credentials found: {S3_HOW}"),
        ([f"run_dir={s3}/runs/x"], {"AWS_PROFILE": "nobody"},
         f"{s3}/runs/x: no AWS credentials: The config profile (nobody) could not be found"),
    ]
    runs = [{"work": str(tmp_path / f"work{i}"), "argv": ["train", config, *QUIET, *overrides], "env": extra}
            for i, (overrides, extra, _) in enumerate(cases)]
    done = subprocess.run([sys.executable, "-c", _RUNNER, json.dumps(runs)], env=no_credentials_env(tmp_path, s3_server),
                          text=True, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for (_, _, line), result in zip(cases, results):
        assert result == {"code": 2, "err": f"jaxllm train: error: {line}", "left": [], "attempts": []}
    assert not os.path.exists(local)
    assert storage.glob(f"{s3}/**", must_match=False) == []  # read with the fixture's keys
