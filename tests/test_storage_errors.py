"""Bad bucket paths given to `jaxllm train`: one line naming the path and what is wrong, exit 2, nothing
created locally and nothing written to the bucket. Real servers refuse: a bucket that does not exist, and
moto enforcing IAM policies (a read-only bucket, a bucket whose objects may not be read)."""
import os

import pytest

from jaxllm import cli, storage
from storage_servers import READ_ONLY, SEALED
from test_storage_train import QUIET, recipe


def refused(tmp_path, capsys, *overrides):
    """Run a 2-step `jaxllm train` with `overrides` from inside an empty folder: (stderr's one line)."""
    work = tmp_path / "work"
    work.mkdir(parents=True)
    config = recipe(tmp_path, "r", tmp_path / "unused", 2)
    os.chdir(work)
    capsys.readouterr()
    assert cli.main(["train", config, *QUIET, *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    assert os.listdir(work) == [] and sorted(os.listdir(tmp_path)) == ["r.yaml", "work"]  # no "gs:" folder, no run
    return err


@pytest.fixture
def here(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # restored after the test (refused() changes into a subfolder)


@pytest.mark.parametrize("server", ["gcs", "s3"])
def test_a_run_dir_in_a_bucket_that_does_not_exist(request, server, tmp_path, capsys, here):
    scheme = request.getfixturevalue(server)[:2]
    run = f"{scheme}://no-such-bucket-jaxllm/runs/x"
    assert refused(tmp_path, capsys, f"run_dir={run}") == (
        f"jaxllm train: error: {run}: the bucket {scheme}://no-such-bucket-jaxllm does not exist")


def test_init_from_a_bucket_that_does_not_exist_writes_nothing_to_the_run_dir(tmp_path, gcs, capsys, here):
    err = refused(tmp_path, capsys, f"run_dir={gcs}/runs/x", "init_from=gs://no-such-bucket-jaxllm/ckpt")
    assert err == "jaxllm train: error: gs://no-such-bucket-jaxllm/ckpt: the bucket gs://no-such-bucket-jaxllm does not exist"
    assert storage.glob(f"{gcs}/**", must_match=False) == []


def test_an_unknown_scheme(tmp_path, capsys, here):
    assert refused(tmp_path, capsys, "run_dir=hdfs://namenode/runs/x") == (
        "jaxllm train: error: hdfs://namenode/runs/x: unsupported storage scheme 'hdfs://' (jaxllm reads and writes "
        "local paths, gs:// and s3://)")


def test_permission_denied_writing_the_run_dir_and_reading_init_from(tmp_path, s3_denied, capsys, here):
    run = f"s3://{READ_ONLY}/runs/x"
    err = refused(tmp_path, capsys, f"run_dir={run}")
    assert err.startswith(f"jaxllm train: error: s3://{READ_ONLY}/runs/x/") and err.endswith(": permission denied")
    assert storage.glob(f"s3://{READ_ONLY}/**", must_match=False) == [f"s3://{READ_ONLY}/ckpt",
                                                                     f"s3://{READ_ONLY}/ckpt/model.json"]
    assert refused(tmp_path / "b", capsys, f"run_dir={tmp_path}/b/run", f"init_from=s3://{SEALED}/ckpt") == (
        f"jaxllm train: error: s3://{SEALED}/ckpt/model.json: permission denied")
