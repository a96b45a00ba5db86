"""The train loop end to end on a tiny model (8 fake devices, fsdp 4 × tensor 2): a killed, a SIGTERMed and
a corrupted run each resume to bit-identical parameters and the same batches as an uninterrupted run."""
import json
import os
import shutil
import signal

import jax
import numpy as np
import pytest

from jaxllm.checkpoint import load_params
from jaxllm.train.config import from_dict
from jaxllm.train.loop import train

STEPS = 6


def tiny_config(run_dir, **sections):
    data = {"sources": [{"name": "zh", "path": "assets:demo/zh_poems.jsonl.gz", "weight": 1},
                        {"name": "en", "path": "assets:demo/en_kjv.jsonl.gz", "weight": 2}],
            "tokenizer": "assets:demo/tokenizer.model", "seq_len": 32, "add_bos": False, "shuffle_window": 64}
    config = {"run_dir": str(run_dir), "seed": 3,
              "model": {"preset": "llama2-tiny", "vocab_size": 4096, "dtype": "float32"},
              "data": data, "optimizer": {"lr": 1e-2, "warmup_steps": 2},
              "mesh": {"data": 1, "fsdp": 4, "tensor": 2},
              "train": {"steps": STEPS, "batch_size": 8, "grad_accum": 2},
              "checkpoint": {"every": 2, "keep": 3},
              "log": {"every": 1, "progress": False}}
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values} if isinstance(values, dict) else values
    return from_dict(config)


def host(tree):
    return jax.tree.map(np.asarray, tree)


def assert_identical(a, b):
    leaves_a, leaves_b = jax.tree.leaves(host(a)), jax.tree.leaves(host(b))
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(x, y)


def recorder(into):
    return lambda step, batch: into.__setitem__(step, {k: np.array(v) for k, v in batch.items()})


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    batches, losses = {}, {}
    result = train(tiny_config(run_dir), on_batch=recorder(batches),
                   on_step=lambda s, m: losses.__setitem__(s, m["loss"]), log=lambda *_: None)
    assert result.step == STEPS and result.exit_code == 0 and sorted(batches) == list(range(1, STEPS + 1))
    return {"dir": run_dir, "params": host(result.params), "opt_state": host(result.opt_state),
            "batches": batches, "losses": losses}


def assert_same_batches(got, want):
    assert sorted(got) == sorted(want)
    for step in want:
        for key in want[step]:
            np.testing.assert_array_equal(got[step][key], want[step][key], err_msg=f"step {step} {key}")


def test_reference_run_writes_the_run_directory(reference):
    run = reference["dir"]
    for name in ("config.yaml", "tokenizer.model", "metrics.jsonl", "loss.png", "checkpoints/model.json"):
        assert (run / name).is_file(), name
    assert any((run / "tb").iterdir())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert {"loss", "grad_norm", "lr", "tokens_per_s", "tokens_per_s_per_device", "data/documents"} <= set(records[-1])
    assert records[-1]["loss"] < records[0]["loss"]
    params, config = load_params(run)  # a run directory is a checkpoint directory
    assert config.name == "llama2-tiny"
    assert_identical(params, reference["params"])


def test_preempted_and_killed_run_resumes_bit_identically(reference, tmp_path):
    """SIGTERM at step 2 (a save, then exit), a crash at step 5 (no save), then a clean finish."""
    config = tiny_config(tmp_path / "run")
    checkpoints = tmp_path / "run" / "checkpoints"
    batches = {}

    def preempt(step, metrics):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    result = train(tiny_config(tmp_path / "run", checkpoint={"every": 100}), on_batch=recorder(batches),
                   on_step=preempt, log=lambda *_: None)
    assert result.exit_code == 128 + signal.SIGTERM and result.stop_reason == "signal SIGTERM"
    assert result.step == 3  # the step in flight when the signal came is finished, then saved
    assert sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) == [3]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is restored

    def crash(step, metrics):
        if step == 5:
            raise RuntimeError("killed")

    messages = []
    with pytest.raises(RuntimeError, match="killed"):
        train(config, on_batch=recorder(batches), on_step=crash, log=messages.append)
    assert any("resumed" in m and "step 3" in m for m in messages)
    assert sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) == [3, 4]

    messages = []
    result = train(config, on_batch=recorder(batches), log=messages.append)
    assert any("resumed" in m and "step 4" in m for m in messages)
    assert result.step == STEPS and result.exit_code == 0
    assert_same_batches(batches, reference["batches"])
    assert_identical(result.params, reference["params"])
    assert_identical(result.opt_state, reference["opt_state"])
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))  # steps redone after the crash are logged once


def test_damaged_checkpoints_are_reported_and_an_earlier_one_used(reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference["dir"], run)
    checkpoints = run / "checkpoints"
    assert sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) == [2, 4, 6]
    truncated = max((p for p in (checkpoints / "6" / "params").rglob("*") if p.is_file()),
                    key=lambda p: p.stat().st_size)
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    shutil.rmtree(checkpoints / "4" / "opt_state")  # missing files
    messages, batches = [], {}
    result = train(tiny_config(run), on_batch=recorder(batches), log=messages.append)
    for step in (6, 4):
        assert any(f"checkpoint step {step}" in m and "unreadable" in m for m in messages), messages
        assert (run / "checkpoints.corrupt" / str(step)).is_dir()
    assert any("resumed" in m and "step 2" in m for m in messages)
    assert_same_batches(batches, {s: reference["batches"][s] for s in range(3, STEPS + 1)})
    assert_identical(result.params, reference["params"])
