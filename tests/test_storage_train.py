"""`jaxllm train` with run_dir=gs://… against the GCS emulator: everything lands in the bucket, a rerun
resumes bit-identically, and the run-directory lock holds there as on disk."""
import json
import socket

import jax
import numpy as np
import pytest

from jaxllm import cli, storage
from jaxllm.checkpoint import load_params
from test_train_loop import tiny_config

QUIET = ["log.progress=false"]


def recipe(tmp_path, name, run, steps):
    path = tmp_path / f"{name}.yaml"
    path.write_text(tiny_config(run, train={"steps": steps}, optimizer={"decay_steps": 4}).to_yaml())
    return str(path)


@pytest.mark.parametrize("store", ["gcs", "s3"])
def test_train_into_a_bucket_and_resume_bit_identically(tmp_path, store, request, capsys):
    bucket = request.getfixturevalue(store)
    straight, resumed = f"{bucket}/runs/straight", f"{bucket}/runs/resumed"
    assert cli.main(["train", recipe(tmp_path, "a", straight, 4), *QUIET]) == 0
    assert not list(tmp_path.glob("gs*")) and not list(tmp_path.glob("s3*"))  # no local folder "gs:"
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "tokenizer.model", "checkpoints/model.json"):
        assert storage.is_file(f"{straight}/{name}"), name
    assert storage.glob(f"{straight}/tb/events.out.tfevents.*")
    assert not storage.exists(f"{straight}/lock")  # released at the end
    # two steps, then the same command told to go on to four: it resumes from the bucket's step 2
    assert cli.main(["train", recipe(tmp_path, "b", resumed, 2), *QUIET]) == 0
    assert cli.main(["train", recipe(tmp_path, "b4", resumed, 4), *QUIET]) == 0
    assert "resum" in capsys.readouterr().out.lower()
    steps = [json.loads(line)["step"] for line in storage.read_text(f"{resumed}/metrics.jsonl").splitlines()]
    assert steps == [1, 2, 3, 4]
    a, _ = load_params(f"{straight}/checkpoints")
    b, _ = load_params(f"{resumed}/checkpoints")
    assert all(jax.tree.leaves(jax.tree.map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), a, b)))
    # the event files in the bucket hold every step's loss (TensorBoard reads gs:// itself)
    losses = [step for event in storage.glob(f"{straight}/tb/events.out.tfevents.*")
              for step, tag in scalars(storage.read_bytes(event)) if tag == "loss"]
    assert sorted(losses) == [1, 2, 3, 4]


def scalars(data: bytes):
    """(step, tag) of each scalar in a TensorBoard event file (TFRecord framing: length, crc, data, crc)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    at = 0
    while at < len(data):
        (n,) = struct.unpack("<Q", data[at:at + 8])
        event = Event.FromString(data[at + 12:at + 12 + n])
        at += 12 + n + 4
        for value in event.summary.value:
            yield event.step, value.tag


def test_a_held_bucket_run_dir_refuses_a_second_command(tmp_path, gcs, capsys):
    run = f"{gcs}/runs/held"
    holder = {"host": "tpu-host-7", "pid": 4242, "start": None, "token": "x", "since": "2026-01-01 00:00:00",
              "command": "jaxllm train"}
    assert storage.create_exclusive(f"{run}/lock", json.dumps(holder))
    assert cli.main(["train", recipe(tmp_path, "h", run, 2), *QUIET]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"jaxllm train: error: run directory {run} is in use by pid 4242 on tpu-host-7 (`jaxllm train`) "
                   f"since 2026-01-01 00:00:00; wait for it to finish, stop it, or choose another run_dir=…")
    assert socket.gethostname() != "tpu-host-7"
