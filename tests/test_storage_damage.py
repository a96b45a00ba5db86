"""A damaged checkpoint in a bucket falls back as on disk, with jaxllm's one line and nothing else (no
orbax traceback, no `Exception ignored in: <coroutine …>`): four kinds of damage to step 4 of a run in the
GCS emulator (one zarr store per array) and on moto's S3 (OCDBT), each resumed from step 2."""
import contextlib
import io
import subprocess
import sys

import pytest

from jaxllm import cli, storage
from storage_servers import _new_bucket as new_bucket
from test_train_loop import tiny_config

QUIET = ["log.tensorboard=false", "log.progress=false"]
NOISE = ("Traceback", "Event loop", "never retrieved", "Exception ignored", "TensorStore({", "coroutine")


def recipe(path, run):
    path.write_text(tiny_config(run, train={"steps": 4}, optimizer={"decay_steps": 4}).to_yaml())
    return str(path)


@pytest.fixture(scope="module", params=["gcs", pytest.param("s3", marks=pytest.mark.slow)])
def trained(request, tmp_path_factory):
    """A 4-step run in a bucket with checkpoints at 2 and 4."""
    request.getfixturevalue(f"{request.param}_server")
    bucket = new_bucket("gs" if request.param == "gcs" else "s3")
    run = f"{bucket}/trained"
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(["train", recipe(tmp_path_factory.mktemp("r") / "t.yaml", run), *QUIET]) == 0
    return bucket, run


def arrays(step_dir: str) -> list[str]:
    """The array data objects of a step's params, largest first (orbax's metadata files left out)."""
    found = [p for p in storage.glob(f"{step_dir}/params/**") if storage.is_file(p)
             and not p.rsplit("/", 1)[-1].startswith(("_", ".z", "zarr.json", "manifest", "commit_success"))
             and "/array_metadatas/" not in p]
    return sorted(found, key=lambda p: (-storage.size(p), p))


def damage(kind: str, step_dir: str) -> str:
    """Damage step_dir as `kind` says; the object damaged."""
    if kind == "metadata deleted":  # orbax's tree metadata and each store's own (zarr or OCDBT manifest)
        gone = [p for p in storage.glob(f"{step_dir}/params/**") if storage.is_file(p)
                and p.rsplit("/", 1)[-1] in ("_METADATA", ".zarray", "zarr.json", "manifest.ocdbt")]
        for name in gone:
            storage.remove(name)
        return gone[0]
    target, other = arrays(step_dir)[:2]
    data = storage.read_bytes(target)
    if kind == "truncated":
        storage.write_atomic(target, data[: len(data) // 2])
    elif kind == "overwritten":  # another array's bytes: well-formed, wrong values
        storage.write_atomic(target, storage.read_bytes(other))
    else:  # garbage inside: the same length, the middle inverted
        middle = slice(len(data) // 4, 3 * len(data) // 4)
        storage.write_atomic(target, data[:middle.start] + bytes(255 - b for b in data[middle]) + data[middle.stop:])
    return target


@pytest.mark.parametrize("kind", ["truncated", "metadata deleted", "overwritten", "garbage inside"])
def test_a_damaged_step_in_a_bucket_falls_back_in_one_line(trained, kind, tmp_path):
    bucket, source = trained
    run = f"{bucket}/{kind.replace(' ', '-')}"
    storage.copytree(source, run)
    damage(kind, f"{run}/checkpoints/4")
    done = subprocess.run([sys.executable, "-m", "jaxllm.cli", "train", recipe(tmp_path / "t.yaml", run),
                           "train.steps=2", *QUIET], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = (done.stdout + done.stderr).splitlines()
    noise = [line for line in lines if any(word in line for word in NOISE)]
    assert noise == [], "\n".join(noise[:20])
    (warning,) = [line for line in lines if "damaged" in line]
    assert warning.startswith("warning: checkpoint step 4 is damaged (")
    assert warning.endswith(f"moved to {run}/checkpoints.corrupt/4, resuming from step 2")
    assert "done at step 2/2" in done.stdout
    assert not storage.exists(f"{run}/checkpoints/4") and storage.exists(f"{run}/checkpoints.corrupt/4")
    assert not list(tmp_path.glob("gs*")) and not list(tmp_path.glob("s3*"))
