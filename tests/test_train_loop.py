"""The train loop end to end on a tiny model (8 fake devices, fsdp 4 × tensor 2): a killed, a SIGTERMed and
a corrupted run each resume to bit-identical parameters and the same batches as an uninterrupted run."""
import json
import os
import shutil
import signal

import jax
import numpy as np
import pytest

from jaxllm.checkpoint import CheckpointError, load_params
from jaxllm.config import ConfigError
from jaxllm.train.config import from_dict
from jaxllm.train import flops
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
              "log": {"every": 1, "progress": False, "peak_tflops": 0.5}}  # CPUs have no known peak
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
    config = tiny_config(run)
    per_token = flops.flops_per_token(config.model, config.data.seq_len)
    assert "tokens_per_s" not in records[0]  # the first step compiles: no throughput
    for r in records[1:]:  # MFU = tokens/s × FLOPs/token / (devices × peak), spec §9
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * per_token / (8 * 0.5e12), rel=1e-6)
        assert r["tokens_per_s_per_device"] == pytest.approx(r["tokens_per_s"] / 8)
    assert all(r["z_loss"] == 0.0 and r["skipped"] == 0 for r in records)
    assert records[0]["lr"] == 0.0 and records[1]["lr"] > 0  # linear warmup from 0
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


def largest_array_file(step_dir):
    return max((p for p in (step_dir / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_damaged_checkpoints_are_reported_and_an_earlier_one_used(reference, tmp_path):
    """Step 6 truncated, step 4 with one byte changed in an array file (which orbax reads back without an
    error: only its digest tells): one line each naming the step, the file or tensor, and the cause; both
    moved aside; the run resumes from step 2 and ends where the uninterrupted run did."""
    run = tmp_path / "run"
    shutil.copytree(reference["dir"], run)
    checkpoints = run / "checkpoints"
    assert sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) == [2, 4, 6]
    truncated = largest_array_file(checkpoints / "6")
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    flipped = largest_array_file(checkpoints / "4")
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    messages, batches = [], {}
    result = train(tiny_config(run), on_batch=recorder(batches), log=messages.append)
    damaged = [m for m in messages if "is damaged" in m]
    assert len(damaged) == 2 and all("\n" not in m for m in damaged), messages
    six, four = sorted(damaged, key=lambda m: "step 4" in m)
    assert six.startswith("warning: checkpoint step 6 is damaged (") and f'{checkpoints}/6/params/"' in six
    assert "TensorStore" not in six and "is not valid for value of size" in six  # the cause, not orbax's repr
    assert four.startswith("warning: checkpoint step 4 is damaged (") and "params/" in four
    assert "differs from the digest recorded when it was saved" in four and "resuming from step 2" in four
    for step in (6, 4):
        assert (run / "checkpoints.corrupt" / str(step)).is_dir()
    assert any("resumed" in m and "step 2" in m for m in messages)
    assert_same_batches(batches, {s: reference["batches"][s] for s in range(3, STEPS + 1)})
    assert_identical(result.params, reference["params"])


def test_a_run_whose_checkpoints_all_fail_stops_and_keeps_them(reference, tmp_path):
    """When no step restores (the cause may be the environment), the run refuses to start over from step 0,
    which would overwrite its metrics and bury its checkpoints; nothing is moved."""
    run = tmp_path / "run"
    shutil.copytree(reference["dir"], run)
    for step in (2, 4, 6):
        shutil.rmtree(run / "checkpoints" / str(step) / "opt_state")
    metrics = (run / "metrics.jsonl").read_text()
    with pytest.raises(CheckpointError, match="none of the 3 checkpoints could be restored"):
        train(tiny_config(run), log=lambda *_: None)
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4, 6]
    assert not (run / "checkpoints.corrupt").exists()
    assert (run / "metrics.jsonl").read_text() == metrics


def test_keep_n_prunes_older_checkpoints(tmp_path):
    result = train(tiny_config(tmp_path / "run", checkpoint={"every": 1, "keep": 2}), log=lambda *_: None)
    assert result.step == STEPS
    checkpoints = tmp_path / "run" / "checkpoints"
    kept = sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
    assert kept == [STEPS - 1, STEPS]
    assert not any((checkpoints / ".retired").iterdir())  # retired by a rename, then deleted


def test_resuming_with_another_host_count_is_refused(reference, tmp_path):
    """Each host saved its own data-iterator state: another host count cannot continue the same batches."""
    run = tmp_path / "run"
    shutil.copytree(reference["dir"], run)
    from jaxllm.checkpoint.training import json_digest

    for meta_file in (run / "checkpoints").glob("*/meta/metadata"):
        meta = json.loads(meta_file.read_text())
        assert meta["hosts"] == 1
        meta = {k: v for k, v in meta.items() if k != "checksum"} | {"hosts": 2}
        meta_file.write_text(json.dumps({**meta, "checksum": json_digest(meta)}))  # as two hosts would write
    with pytest.raises(ConfigError, match=r"written by 2 host\(s\).*resume with 2 host\(s\), not 1"):
        train(tiny_config(run), log=lambda *_: None)
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4, 6]


def test_a_sigkilled_process_resumes_bit_identically(reference, tmp_path):
    """A real crash: the process is SIGKILLed (no handler, no cleanup) with an asynchronous save possibly in
    flight; the rerun resumes from the newest complete checkpoint and ends where the uninterrupted run did."""
    import subprocess
    import sys
    from pathlib import Path

    run = tmp_path / "run"
    script = (f"import os, signal, sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
              "from test_train_loop import tiny_config\nfrom jaxllm.train.loop import train\n"
              "def kill(step, metrics):\n    if step == 3: os.kill(os.getpid(), signal.SIGKILL)\n"
              f"train(tiny_config({str(run)!r}), on_step=kill, log=lambda *_: None)\n")
    crashed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    messages, batches = [], {}
    result = train(tiny_config(run), on_batch=recorder(batches), log=messages.append)
    resumed_at = [m for m in messages if m.startswith("resumed")]
    start = int(resumed_at[0].rsplit("step ", 1)[1]) if resumed_at else 0
    assert start in (0, 2, 4)
    assert result.step == STEPS
    assert_same_batches(batches, {s: reference["batches"][s] for s in range(start + 1, STEPS + 1)})
    assert_identical(result.params, reference["params"])
    assert_identical(result.opt_state, reference["opt_state"])
