"""jaxllm.storage against real servers: the GCS emulator and moto's S3, and local paths."""
import pytest

from jaxllm import storage


@pytest.fixture(params=["local", "gcs", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path)
    return request.getfixturevalue(request.param)


def test_paths_keep_their_scheme(gcs):
    p = storage.path(gcs) / "runs" / "demo"
    assert str(p) == f"{gcs}/runs/demo"
    assert str(p.parent) == f"{gcs}/runs" and p.name == "demo"


def test_write_read_list_glob_rename_remove(root):
    storage.write_atomic(f"{root}/a/x.txt", "hello")
    storage.write_atomic(f"{root}/a/y.bin", b"\x00\x01")
    assert storage.write_lines_atomic(f"{root}/a/b/z.jsonl", ["1", "2"]) == 2
    assert storage.read_text(f"{root}/a/x.txt") == "hello"
    assert storage.read_bytes(f"{root}/a/y.bin") == b"\x00\x01"
    assert storage.size(f"{root}/a/y.bin") == 2
    assert storage.exists(f"{root}/a/x.txt") and storage.is_file(f"{root}/a/x.txt")
    assert storage.is_dir(f"{root}/a") and not storage.exists(f"{root}/nothing")
    assert storage.listdir(f"{root}/a") == ["b", "x.txt", "y.bin"]
    assert storage.glob(f"{root}/a/**/*.jsonl") == [f"{root}/a/b/z.jsonl"]
    with storage.open(f"{root}/a/b/z.jsonl", "r") as f:
        assert f.read() == "1\n2\n"
    storage.rename(f"{root}/a/b", f"{root}/c")
    assert storage.read_text(f"{root}/c/z.jsonl") == "1\n2\n" and not storage.exists(f"{root}/a/b/z.jsonl")
    storage.copy(f"{root}/a/x.txt", f"{root}/c/x.txt")
    storage.remove(f"{root}/a/x.txt")
    assert not storage.exists(f"{root}/a/x.txt") and storage.read_text(f"{root}/c/x.txt") == "hello"
    storage.rmtree(f"{root}/c")
    assert not storage.exists(f"{root}/c/x.txt")


def test_create_exclusive_once(root):
    assert storage.create_exclusive(f"{root}/lock", "first")
    assert not storage.create_exclusive(f"{root}/lock", "second")
    assert storage.read_text(f"{root}/lock") == "first"


def test_one_line_errors(gcs, s3):
    with pytest.raises(storage.StorageError, match=r"^hdfs://x/y: unsupported storage scheme 'hdfs://'"):
        storage.path("hdfs://x/y")
    with pytest.raises(storage.StorageError, match=r"no files match$"):
        storage.glob(f"{gcs}/corpus/*.jsonl.gz")
    for bucket in ("gs://no-such-bucket-jaxllm", "s3://no-such-bucket-jaxllm"):
        with pytest.raises(storage.StorageError, match=f"^{bucket}/x.*does not exist") as err:
            storage.read_text(f"{bucket}/x")
        assert "\n" not in str(err.value)
        with pytest.raises(storage.StorageError, match="does not exist"):
            storage.check_bucket(f"{bucket}/runs")
    with pytest.raises(FileNotFoundError, match=f"^{gcs}/missing: no such file"):
        storage.read_text(f"{gcs}/missing")


def test_missing_package_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gcsfs" else real(name, *a))
    with pytest.raises(storage.StorageError, match=r"gs://b/x: gs:// needs the gcsfs package: pip install 'jaxllm\[cloud\]'"):
        storage.path("gs://b/x")
