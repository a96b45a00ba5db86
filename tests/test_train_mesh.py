"""The loop on different meshes, from converted parameters (--init-from), and with a non-finite loss."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.checkpoint import load_params, save_params
from jaxllm.models import init_params
from jaxllm.config import ConfigError
from jaxllm.train.loop import maybe_initialize_distributed, train
from jaxllm.train.stage import pretraining_stage
from test_train_loop import assert_identical, host, tiny_config


def test_fsdp_and_tensor_parallel_run_matches_one_device(tmp_path):
    sharded = tiny_config(tmp_path / "sharded", train={"steps": 3}, mesh={"data": 1, "fsdp": 4, "tensor": 2})
    single = tiny_config(tmp_path / "single", train={"steps": 3}, mesh={"data": 1, "fsdp": 1, "tensor": 1})
    losses = {"sharded": [], "single": []}
    a = train(sharded, on_step=lambda s, m: losses["sharded"].append(m["loss"]), log=lambda *_: None)
    b = train(single, devices=jax.devices()[:1], on_step=lambda s, m: losses["single"].append(m["loss"]),
              log=lambda *_: None)
    assert len(jax.tree.leaves(a.params)[0].sharding.device_set) == 8
    assert len(jax.tree.leaves(b.params)[0].sharding.device_set) == 1
    np.testing.assert_allclose(losses["sharded"], losses["single"], rtol=1e-5)
    for x, y in zip(jax.tree.leaves(host(a.params)), jax.tree.leaves(host(b.params))):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_non_finite_losses_skip_updates_then_stop_after_saving(tmp_path):
    config = tiny_config(tmp_path / "run", train={"steps": 10, "max_nan_streak": 3},
                         init_from=str(tmp_path / "init"))
    start = init_params(config.model, jax.random.key(42))
    save_params(tmp_path / "init", start, config.model)  # what `jaxllm convert` writes
    stage = pretraining_stage(config)
    lm = stage.loss_fn

    def exploding(params, batch, rng):
        loss, metrics = lm(params, batch, rng)
        return loss * jnp.nan, metrics

    messages = []
    result = train(config, dataclasses.replace(stage, loss_fn=exploding), log=messages.append)
    assert result.exit_code == 1 and result.stop_reason == "non-finite loss"
    assert 3 <= result.step < 10 and result.nan_skipped == result.step
    assert any("3 consecutive steps with a non-finite loss" in m for m in messages)
    assert_identical(result.params, start)  # every update was skipped
    saved, _ = load_params(tmp_path / "run")
    assert_identical(saved, start)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["skipped"] == 1 for r in records) and records[-1]["nan_skipped"] == result.step


@pytest.mark.parametrize("env, mode, expected", [
    ({}, "auto", None),                                                  # one host: nothing to do
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "2"}, "auto",
     {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2}),
    ({"SLURM_NTASKS": "8"}, "auto", {}),                                 # JAX detects SLURM itself
    ({"TPU_WORKER_HOSTNAMES": "t0,t1"}, "auto", {}),                     # a TPU pod slice
    ({"JAX_NUM_PROCESSES": "4"}, "no", None),
    ({}, "yes", {}),
])
def test_multi_host_start_up_follows_the_environment(monkeypatch, env, mode, expected):
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS",
                "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    maybe_initialize_distributed(mode)
    assert calls == ([] if expected is None else [expected])


def test_a_malformed_process_count_is_named(monkeypatch):
    monkeypatch.setenv("JAX_NUM_PROCESSES", "four")
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: None)
    with pytest.raises(ConfigError, match="JAX_NUM_PROCESSES='four' is not an integer"):
        maybe_initialize_distributed()
