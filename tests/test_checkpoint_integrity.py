"""Checkpoints that cannot be silently wrong: array digests (host and device agree), damaged and
wrong-kind checkpoints named in one line, debris of interrupted saves removed, one writer per run dir."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxllm import checkpoint as jckpt
from jaxllm.checkpoint import CheckpointError, DamagedCheckpoint, StreamedArray, load_params, open_arrays, save_params
from jaxllm.checkpoint.digests import HostDigest, device_digests, host_digest
from jaxllm.models import get_preset, init_params
from jaxllm.train import rundir

CFG = get_preset("llama2-tiny")


# ----------------------------------------------------------------------------------------- digests

def test_device_and_host_digests_agree_for_every_dtype_layout_and_block_order():
    rng = np.random.default_rng(0)
    tree = {"f32": rng.normal(size=(4, 6, 10)).astype(np.float32), "i32": rng.integers(-9, 9, (7,), np.int32),
            "bf16": np.asarray(jnp.asarray(rng.normal(size=(8, 16)), jnp.bfloat16)),
            "f16": rng.normal(size=(3, 5)).astype(np.float16), "scalar": np.array(3.5, np.float32),
            "bool": np.array([True, False, True]), "long": rng.normal(size=(2, 300_000)).astype(np.float32)}
    host = {name: host_digest(value) for name, value in tree.items()}
    assert device_digests(jax.tree.map(jnp.asarray, tree)) == host
    mesh = jax.make_mesh((4, 2), ("x", "y"))  # sharded over 8 devices: the same digest
    sharded = jax.device_put(tree["f32"], NamedSharding(mesh, P("x", None, "y")))
    assert device_digests({"f32": sharded}) == {"f32": host["f32"]}
    blocks = HostDigest((4, 6, 10), np.float32)  # a layer at a time, in any order
    for i in (2, 0, 3, 1):
        blocks.update(i, tree["f32"][i])
    assert blocks.value() == host["f32"]
    changed = tree["f32"].copy()
    changed[1, 2, 3] = np.nextafter(changed[1, 2, 3], np.float32(9))  # one bit
    swapped = tree["f32"].copy()
    swapped[0, 0, [0, 1]] = swapped[0, 0, [1, 0]]
    assert len({host["f32"], host_digest(changed), host_digest(swapped)}) == 3


# ----------------------------------------------------------------------------------------- params-only checkpoints

@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    """A params-only checkpoint written as `convert` writes one: stacked leaves streamed a layer at a time."""
    params = jax.tree.map(np.asarray, init_params(CFG, jax.random.key(0)))

    def streamed(leaf):
        return StreamedArray(leaf.shape, leaf.dtype, lambda: ((i, leaf[i]) for i in range(leaf.shape[0])))

    tree = {**params, "layers": jax.tree.map(streamed, params["layers"])}
    directory = tmp_path_factory.mktemp("lm") / "ckpt"
    save_params(directory, tree, CFG)
    return directory, params


def flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_params_only_checkpoint_records_kind_and_digests_and_reads_back_verified(lm_dir):
    directory, params = lm_dir
    record = json.loads((directory / "0" / "record.json").read_text())
    assert record["kind"] == "lm"
    assert record["digests"]["params"]["layers/mlp/up"] == host_digest(params["layers"]["mlp"]["up"])
    restored, _ = load_params(directory)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), b)
    bf16, _ = load_params(directory, dtype="bfloat16")  # verified as stored, then cast
    assert bf16["embedding"].dtype == jnp.bfloat16


def test_a_bfloat16_checkpoint_loads_into_a_float32_config_verified_as_stored(tmp_path):
    """A bf16 release read by a float32 run (`init_from`): checked in the bytes it was saved in, then cast;
    restoring straight into float32 made every digest differ and the checkpoint look damaged."""
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), init_params(CFG, jax.random.key(3)))
    save_params(tmp_path / "bf16", params, CFG.replace(dtype="bfloat16", param_dtype="bfloat16"))
    restored, config = load_params(tmp_path / "bf16", CFG)
    assert config is CFG and restored["layers"]["attn"]["wq"].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(restored["layers"]["attn"]["wq"]),
                                  np.asarray(params["layers"]["attn"]["wq"], np.float32))


def test_a_changed_byte_in_an_array_file_is_named_by_every_reader(lm_dir, tmp_path):
    """orbax reads the changed bytes back without an error; the digests name the tensor, for generate's
    loader and for `convert --to hf`, which reads a layer at a time."""
    directory = tmp_path / "ckpt"
    shutil.copytree(lm_dir[0], directory)
    data = max((p for p in (directory / "0" / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    flip_middle_byte(data)
    with pytest.raises(DamagedCheckpoint, match=r"step 0: params/\S+ differs from the digest recorded") as err:
        load_params(directory)
    assert "\n" not in str(err.value)
    name = str(err.value).split("params/")[1].split()[0]
    arrays = open_arrays(directory, [tuple(name.split("/"))])
    (array,) = arrays.values()
    with pytest.raises(DamagedCheckpoint, match=f"{name} differs from the digest"):
        for i in range(array.shape[0]):
            array.layer(i)


def test_a_checkpoint_of_the_wrong_kind_says_what_it_holds(lm_dir, tmp_path):
    from jaxllm.stages import reward

    with pytest.raises(CheckpointError, match=r"holds a language model, not a reward model \(that comes from "
                                              r"`jaxllm rm`\)"):
        reward.load(lm_dir[0])
    rm_params = reward.from_lm_params(init_params(CFG, jax.random.key(1)), CFG, jax.random.key(2))
    rm_dir = tmp_path / "rm"
    save_params(rm_dir, jax.tree.map(np.asarray, rm_params), CFG)
    with pytest.raises(CheckpointError, match=r"holds a reward model, not a language model") as err:
        load_params(rm_dir)
    assert "\n" not in str(err.value) and "tree" not in str(err.value)
    (rm_dir / "0" / "record.json").unlink()  # written before records: told apart by its parameter tree
    with pytest.raises(CheckpointError, match=r"holds a reward model, not a language model"):
        load_params(rm_dir)
    config, restored = reward.load(rm_dir)
    assert set(restored) == {"backbone", "head"}


def test_a_file_where_a_checkpoint_directory_is_expected_gets_a_hint_that_fits(lm_dir, tmp_path):
    model_json = lm_dir[0] / "model.json"
    with pytest.raises(CheckpointError, match=rf"is a file; .*did you mean {lm_dir[0]}\?"):
        jckpt.resolve(model_json)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(CheckpointError) as err:
        jckpt.resolve(tmp_path / "notes.txt")
    assert "convert" not in str(err.value)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="looks like a HuggingFace model: convert it"):
        jckpt.read_model_config(tmp_path / "hf")


# ----------------------------------------------------------------------------------------- debris

def fake_step(root: Path, name: str, items=("params", "opt_state", "meta"), committed=True) -> Path:
    step = root / name
    for item in items:
        (step / item).mkdir(parents=True)
    if committed:
        (step / "_CHECKPOINT_METADATA").write_text("{}")
    return step


def test_unfinished_saves_and_half_deleted_steps_are_removed_and_finalised_steps_kept(tmp_path):
    from jaxllm.checkpoint.training import RunCheckpoints

    root = tmp_path / "checkpoints"
    fake_step(root, "2")
    fake_step(root, "4", items=("opt_state", "meta"))          # half-deleted by an older jaxllm's retention
    fake_step(root, "5", committed=False)                      # likewise, its commit metadata gone first
    fake_step(root, "6")
    fake_step(root, "8.orbax-checkpoint-tmp-1234", committed=False)  # a save killed before finalisation
    fake_step(root / ".retired", "1")                          # retired, not yet deleted
    fake_step(root, "9", items=("meta",))                      # the newest: left to the restore to judge
    lines = []
    ckpts = RunCheckpoints(root, CFG, keep=3, async_save=False, log=lines.append)
    ckpts.close()
    assert sorted(p.name for p in root.iterdir()) == ["2", "6", "9", "model.json"]
    assert len(lines) == 1 and lines[0].startswith(f"removed unfinished checkpoint files in {root}: ")
    for part in ("8.orbax-checkpoint-tmp-1234 (an interrupted save)", ".retired (steps retired by retention)",
                 "4 (incomplete: no params)", "5 (incomplete: no _CHECKPOINT_METADATA)"):
        assert part in lines[0]


# ----------------------------------------------------------------------------------------- the run-directory lock

def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def write_lock(run: Path, **holder) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    info = {"host": socket.gethostname(), "pid": os.getpid(), "start": None, "token": "theirs",
            "since": "2026-01-01 00:00:00", "command": "jaxllm train demo"} | holder
    (run / "lock").write_text(json.dumps(info))
    return run / "lock"


def test_a_live_holder_keeps_the_run_directory_and_a_dead_or_silent_one_loses_it(tmp_path):
    run, lines = tmp_path / "run", []
    parent = os.getppid()  # alive, on this host, not us
    write_lock(run, pid=parent)
    with pytest.raises(rundir.RunDirLocked, match=rf"run directory {run} is in use by pid {parent} on "
                                                  rf"{socket.gethostname()} \(`jaxllm train demo`\) since"):
        rundir.RunLock.acquire(run, log=lines.append)
    write_lock(run, host="elsewhere", pid=1)  # another host, heartbeat fresh
    with pytest.raises(rundir.RunDirLocked, match="in use by pid 1 on elsewhere"):
        rundir.RunLock.acquire(run, log=lines.append)
    assert lines == []
    old = time.time() - rundir.STALE_AFTER_S - 60
    os.utime(run / "lock", (old, old))  # ... whose heartbeat stopped
    lock = rundir.RunLock.acquire(run, log=lines.append)
    assert lines == [f"run directory {run}: taking over the lock of pid 1 on elsewhere (no heartbeat for 6 min)"]
    assert json.loads((run / "lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (run / "lock").exists()
    dead = _dead_pid()
    write_lock(run, pid=dead)  # this host, the process is gone (a kill -9)
    lock = rundir.RunLock.acquire(run, log=lines.append)
    assert lines[-1] == (f"run directory {run}: taking over the lock of pid {dead} on {socket.gethostname()} "
                         f"(the process no longer runs)")
    lock.release()


def test_a_run_directory_of_another_stage_is_refused_as_such(tmp_path):
    from jaxllm.train.config import RunConfig

    rm = RunConfig(run_dir=str(tmp_path / "rm-demo"), stage_name="rm")
    rundir.claim(rm.run_dir, rm).release()
    assert "stage_name: rm" in (tmp_path / "rm-demo" / "config.yaml").read_text()
    dpo = RunConfig(run_dir=rm.run_dir, stage_name="dpo")
    with pytest.raises(rundir.RunDirError, match=r"rm-demo holds a `jaxllm rm` run, not a `jaxllm dpo` one"):
        rundir.claim(dpo.run_dir, dpo)
