"""`jaxllm sft`, `jaxllm ppo` and `jaxllm rejection-sample` with their run directory / output in a bucket
(the GCS emulator; S3 on moto in the slow suite): everything lands in the bucket, and a rerun resumes from it."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from jaxllm import cli, storage
from tiny_chain import KILLER, save_policy_and_reward_model

ASSETS = Path(__file__).resolve().parent.parent / "jaxllm" / "assets"
MODEL = {"preset": "llama2-tiny", "vocab_size": 4096}


def sft_recipe(tmp_path, name, run_dir, steps):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "run_dir": run_dir, "seed": 0, "model": MODEL,
        "data": {"sources": [{"path": str(ASSETS / "stages" / "sft_sample.jsonl")}],
                 "tokenizer": str(ASSETS / "demo" / "tokenizer.model"), "seq_len": 64},
        "optimizer": {"warmup_steps": 0, "lr": 3e-3, "decay_steps": 4},
        "mesh": {"data": 1, "fsdp": -1, "tensor": 1}, "train": {"steps": steps, "batch_size": 8},
        "checkpoint": {"every": 2, "keep": 3},
        "log": {"every": 1, "progress": False}}))
    return str(path)


@pytest.mark.parametrize("store", ["gcs", pytest.param("s3", marks=pytest.mark.slow)])
def test_sft_into_a_bucket_and_resume(tmp_path, store, request, capsys, monkeypatch):
    gcs = request.getfixturevalue(store)  # the bucket
    # (bit-identical resume is tests/test_stages.py's; here: that it all goes through the bucket)
    monkeypatch.chdir(tmp_path)  # a local folder named "gs:" would appear here
    run = f"{gcs}/sft/run"
    assert cli.main(["sft", sft_recipe(tmp_path, "a", run, 2)]) == 0
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "tokenizer.model", "checkpoints/model.json",
                 "checkpoints/2/meta/metadata"):
        assert storage.is_file(f"{run}/{name}"), name
    assert storage.glob(f"{run}/tb/events.out.tfevents.*") and not storage.exists(f"{run}/lock")
    capsys.readouterr()
    assert cli.main(["sft", sft_recipe(tmp_path, "b", run, 4)]) == 0  # the same run, told to go on to 4
    assert f"resumed {run} at step 2" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in storage.read_text(f"{run}/metrics.jsonl").splitlines()]
    assert steps == [1, 2, 3, 4]
    assert storage.is_file(f"{run}/checkpoints/4/meta/metadata")
    assert not list(tmp_path.glob("gs*")) and not list(tmp_path.glob("s3*"))


def restore_item(directory, step, item):
    """One array item of a step, as numpy (whatever its handler wrote: OCDBT or one zarr store per array)."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
        return jax.tree.map(np.asarray, checkpointer.restore(storage.path(f"{directory}/{step}/{item}")))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny policy (with the demo tokenizer) and a reward model grown from it, saved locally."""
    return save_policy_and_reward_model(tmp_path_factory.mktemp("models"))[1:]


def ppo_args(models, run_dir, iterations):
    policy, rm = models
    return ["ppo", "ppo-demo", "--policy", str(policy), "--reward-model", str(rm), "--run-dir", run_dir,
            f"ppo.iterations={iterations}", "ppo.save_every=1", "ppo.batch_size=4", "ppo.minibatch_size=2",
            "ppo.max_new_tokens=4", "ppo.lr=1e-4", "mesh.fsdp=1", "mesh.tensor=8"]


@pytest.mark.slow
@pytest.mark.parametrize("store", ["gcs", "s3"])
def test_ppo_into_a_bucket_resumes_like_an_uninterrupted_run(tmp_path, store, request, models, capsys, monkeypatch):
    gcs = request.getfixturevalue(store)  # the bucket
    monkeypatch.chdir(tmp_path)
    straight, resumed = f"{gcs}/ppo/straight", f"{gcs}/ppo/resumed"
    assert cli.main(ppo_args(models, straight, 3)) == 0
    for name in ("ppo.yaml", "ppo_metrics.jsonl", "ppo.png", "tokenizer.model", "checkpoints/model.json",
                 "checkpoints/3/value/_METADATA"):
        assert storage.is_file(f"{straight}/{name}"), name
    assert storage.glob(f"{straight}/tb/events.out.tfevents.*") and not storage.exists(f"{straight}/lock")
    assert cli.main(ppo_args(models, resumed, 2)) == 0
    capsys.readouterr()
    assert cli.main(ppo_args(models, resumed, 3)) == 0  # the same run told to go on: resumes at iteration 2
    assert "resum" in capsys.readouterr().out.lower()
    logged = [json.loads(line) for line in storage.read_text(f"{resumed}/ppo_metrics.jsonl").splitlines()]
    want = [json.loads(line) for line in storage.read_text(f"{straight}/ppo_metrics.jsonl").splitlines()]
    assert [m["iteration"] for m in logged] == [1, 2, 3]
    assert [m["reward"] for m in logged] == [m["reward"] for m in want]
    for item in ("params", "value"):
        a, b = (restore_item(f"{run}/checkpoints", 3, item) for run in (straight, resumed))
        assert all(jax.tree.leaves(jax.tree.map(np.array_equal, a, b))), item
    assert not list(tmp_path.glob("gs*")) and not list(tmp_path.glob("s3*"))




@pytest.mark.parametrize("store", ["gcs", pytest.param("s3", marks=pytest.mark.slow)])
def test_rejection_sample_from_and_into_a_bucket_resumes_after_sigkill(tmp_path, store, request, models, capsys,
                                                                       monkeypatch):
    gcs = request.getfixturevalue(store)  # the bucket
    monkeypatch.chdir(tmp_path)
    for name, local in zip(("policy", "rm"), models):  # the models are read from the bucket too
        storage.copytree(local, f"{gcs}/{name}")
    args = ["rejection-sample", "--policy", f"{gcs}/policy", "--reward-model", f"{gcs}/rm", "--k", "2",
            "--max-new-tokens", "4", "rejection.batch_size=4"]  # 2 prompts per unit
    straight, resumed = f"{gcs}/best/straight.jsonl", f"{gcs}/best/resumed.jsonl"
    assert cli.main(args + ["-o", straight]) == 0
    assert not storage.glob(f"{straight}.parts/*", must_match=False)  # the units are gone once written
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                                         os.environ.get("PYTHONPATH", "")])}
    killed = subprocess.run([sys.executable, "-c", KILLER, *args, "-o", resumed], capture_output=True, text=True,
                            timeout=600, env=env, cwd=tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not storage.exists(resumed)
    assert storage.listdir(f"{resumed}.parts") == ["0.json", "1.json", "lock", "run.json"]
    from jaxllm.train import engine
    committed, commit = [], engine.Shards.commit
    monkeypatch.setattr(engine.Shards, "commit", lambda self, i, r: (committed.append(i), commit(self, i, r)))
    capsys.readouterr()
    assert cli.main(args + ["-o", resumed]) == 0
    assert committed == [2, 3, 4, 5]  # the two finished units are read back from the bucket
    assert storage.read_bytes(resumed) == storage.read_bytes(straight)
    assert not storage.glob(f"{resumed}.parts/*", must_match=False)
    assert not list(tmp_path.glob("gs*")) and not list(tmp_path.glob("s3*"))
