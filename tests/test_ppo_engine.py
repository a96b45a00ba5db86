"""PPO through the run engine: SIGTERM saves the iteration in flight and exits 128 + the signal, a damaged
checkpoint is reported in one line, quarantined and the one before used, and the run dir has TensorBoard
events — each resumed run ends bit-identical to an uninterrupted one."""
import os
import shutil
import signal

import jax
import numpy as np
import pytest

from jaxllm.models import get_preset, init_params
from jaxllm.rlhf.ppo import PPOConfig, ppo

PROMPTS = [[1, 7, 9], [1, 3], [1, 11, 12, 13], [1, 2]]
ITERATIONS = 4


def count_five(rows):
    return ((rows["targets"] == 5) * rows["response_mask"]).sum(axis=1).astype(np.float32)


def settings(**changes):
    return PPOConfig(**{**dict(iterations=ITERATIONS, batch_size=8, minibatch_size=4, epochs=1, lr=1e-2, beta=0.1,
                               max_new_tokens=6, whiten_scores=False, weight_decay=0.0, save_every=1), **changes})


@pytest.fixture(scope="module")
def policy():
    cfg = get_preset("llama2-tiny", vocab_size=32)
    return cfg, init_params(cfg, jax.random.key(0))


@pytest.fixture(scope="module")
def straight(policy, tmp_path_factory):
    cfg, params = policy
    run_dir = tmp_path_factory.mktemp("ppo") / "straight"
    result = ppo(cfg, params, PROMPTS, count_five, settings(), run_dir=run_dir, log=lambda *_: None)
    assert result.exit_code == 0 and result.stop_reason == "done"
    return run_dir, jax.tree.map(np.asarray, tuple(result[:2])), result[2]


def assert_identical(result, want):
    got = jax.tree.leaves(jax.tree.map(np.asarray, tuple(result[:2])))
    for x, y in zip(got, jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(x, y)


def saved_steps(run_dir):
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


def test_sigterm_saves_the_iteration_exits_143_and_the_resumed_run_is_bit_identical(policy, straight, tmp_path):
    cfg, params = policy
    run_dir = tmp_path / "run"

    def preempt(metrics):
        if metrics["iteration"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    messages = []
    stopped = ppo(cfg, params, PROMPTS, count_five, settings(save_every=100), run_dir=run_dir, on_iteration=preempt,
                  log=messages.append)
    assert stopped.exit_code == 128 + signal.SIGTERM and stopped.stop_reason == "signal SIGTERM"
    assert saved_steps(run_dir) == [2] and [h["iteration"] for h in stopped[2]] == [1, 2]
    assert any(m.startswith("stopped by SIGTERM at iteration 2/4") for m in messages)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is restored
    assert not (run_dir / "lock").exists()
    messages = []
    resumed = ppo(cfg, params, PROMPTS, count_five, settings(save_every=100), run_dir=run_dir, log=messages.append)
    assert "resumed PPO at iteration 2" in messages and resumed.exit_code == 0
    assert_identical(resumed, straight[1])
    assert [h["reward"] for h in resumed[2]] == [h["reward"] for h in straight[2]]
    # TensorBoard events beside ppo_metrics.jsonl, which holds each iteration once
    assert any(p.name.startswith("events.out.tfevents") for p in (run_dir / "tb").iterdir())
    import json
    logged = [json.loads(line)["iteration"] for line in (run_dir / "ppo_metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4]


def largest_array_file(step_dir):
    return max((p for p in (step_dir / "params").rglob("*") if p.is_file() and p.parent.name == "d"),
               key=lambda p: p.stat().st_size)


def truncate(step_dir):
    path = largest_array_file(step_dir)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def delete_metadata(step_dir):
    (step_dir / "meta" / "metadata").unlink()


def overwrite(step_dir):
    path = largest_array_file(step_dir)
    path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))


def garbage_inside(step_dir):
    path = largest_array_file(step_dir)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4096] = np.random.default_rng(1).bytes(4096)
    path.write_bytes(bytes(data[:len(path.read_bytes())]))


@pytest.mark.parametrize("damage", [truncate, delete_metadata, overwrite, garbage_inside],
                         ids=lambda f: f.__name__)
def test_a_damaged_ppo_checkpoint_is_quarantined_in_one_line_and_the_one_before_used(policy, straight, tmp_path,
                                                                                    damage, capfd):
    cfg, params = policy
    run_dir = tmp_path / "run"
    shutil.copytree(straight[0], run_dir)
    assert saved_steps(run_dir) == [3, 4]
    damage(run_dir / "checkpoints" / "4")
    capfd.readouterr()
    messages = []
    resumed = ppo(cfg, params, PROMPTS, count_five, settings(), run_dir=run_dir, log=messages.append)
    (line,) = [m for m in messages if "is damaged" in m]
    assert [m for m in messages if not m.startswith("ppo ")] == [line, "resumed PPO at iteration 3"]
    assert line.startswith("warning: checkpoint step 4 is damaged (") and "\n" not in line
    assert line.endswith(f"moved to {run_dir}/checkpoints.corrupt/4, resuming from step 3")
    assert "resumed PPO at iteration 3" in messages
    assert (run_dir / "checkpoints.corrupt" / "4").is_dir()
    out, err = capfd.readouterr()
    noise = [x for x in (out + err).splitlines() if any(w in x for w in ("Traceback", "Exception ignored",
                                                                         "never retrieved", "TensorStore({"))]
    assert noise == []
    assert_identical(resumed, straight[1])


def test_ppo_profile_window_writes_a_trace(policy, tmp_path):
    from test_profile import check_trace

    cfg, params = policy
    run_dir = tmp_path / "run"
    result = ppo(cfg, params, PROMPTS, count_five, settings(iterations=3, profile="1:2"), run_dir=run_dir,
                 log=lambda *_: None)
    assert result.exit_code == 0
    check_trace(run_dir / "tb", "jit")
