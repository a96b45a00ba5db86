"""SFT / DPO / RM stages on the one train loop: masking, resume, learning signal, CLI."""
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.checkpoint import load_params, save_params
from jaxllm.cli import main as cli
from jaxllm.models import get_preset, init_params
from jaxllm.stages.stages import StageOptions, dpo_stage, reward_accuracy, rm_stage, sft_stage
from jaxllm.train.config import load_config
from jaxllm.train.loop import train
from jaxllm.train.loss import lm_loss

ASSETS = Path(__file__).resolve().parent.parent / "jaxllm" / "assets"
MODEL = {"preset": "llama2-tiny", "vocab_size": 4096}


def run_config(tmp_path, name, sample, steps=6, **extra):
    base = {"run_dir": str(tmp_path / name), "seed": 0, "model": dict(MODEL),
            "data": {"sources": [{"name": "d", "path": str(ASSETS / "stages" / sample)}],
                     "tokenizer": str(ASSETS / "demo" / "tokenizer.model"), "seq_len": 96},
            "optimizer": {"lr": 3e-3, "warmup_steps": 0, "schedule": "constant", "weight_decay": 0.0,
                          "decay_steps": 100},
            "mesh": {"data": 1, "fsdp": -1, "tensor": 1}, "train": {"steps": steps, "batch_size": 8},
            "checkpoint": {"every": 3, "keep": 3, "async_save": False},
            "log": {"every": 1, "progress": False, "tensorboard": False, "plot": False}}
    for key, value in extra.items():
        base[key] = value
    return load_config(None, [], base=base)


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """A tiny 'pretrained' checkpoint to start DPO / RM from."""
    directory = tmp_path_factory.mktemp("start") / "ckpt"
    cfg = get_preset(**{"name": MODEL["preset"]}, vocab_size=4096)
    save_params(directory, jax.tree.map(np.asarray, init_params(cfg, jax.random.key(42))), cfg)
    return directory


def test_masked_tokens_get_exactly_zero_gradient(tmp_path):
    config = run_config(tmp_path, "mask", "sft_sample.jsonl")
    stage = sft_stage(config, StageOptions(), log=lambda *_: None)
    batch = next(stage.make_data(4, 0, 0, 1))
    params = init_params(config.model, jax.random.key(0))
    loss_fn = lm_loss(config.model)
    grad = jax.jit(jax.grad(lambda p, b: loss_fn(p, b, None)[0]))
    changed = dict(batch)
    masked = batch["loss_mask"] == 0
    assert masked.any() and (~masked).any()
    changed["targets"] = np.where(masked, (batch["targets"] + 7) % 4096, batch["targets"])
    a, b = grad(params, batch), grad(params, changed)
    assert all(bool(jnp.array_equal(x, y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    # and the mask covers only assistant replies: the prompt's "[INST]" is never a target
    assert not np.any(batch["loss_mask"][batch["tokens"] == 0])


def test_sft_resumes_exactly_like_pretraining(tmp_path):
    straight = train(run_config(tmp_path, "straight", "sft_sample.jsonl", steps=6),
                     sft_stage(run_config(tmp_path, "straight", "sft_sample.jsonl", steps=6), StageOptions(),
                               log=lambda *_: None), log=lambda *_: None)
    first = run_config(tmp_path, "resumed", "sft_sample.jsonl", steps=3)
    train(first, sft_stage(first, StageOptions(), log=lambda *_: None), log=lambda *_: None)
    second = run_config(tmp_path, "resumed", "sft_sample.jsonl", steps=6)
    resumed = train(second, sft_stage(second, StageOptions(), log=lambda *_: None), log=lambda *_: None)
    assert resumed.step == straight.step == 6
    for x, y in zip(jax.tree.leaves(straight.params), jax.tree.leaves(resumed.params)):
        assert np.array_equal(np.asarray(x), np.asarray(y))


def test_dpo_raises_reward_accuracy_above_chance(tmp_path, start):
    config = run_config(tmp_path, "dpo", "dpo_sample.jsonl", steps=12, init_from=str(start))
    config.optimizer.lr = 2e-3
    seen = []
    result = train(config, dpo_stage(config, StageOptions(beta=0.5), log=lambda *_: None),
                   on_step=lambda step, m: seen.append(m), log=lambda *_: None)
    assert seen[0]["loss"] == pytest.approx(np.log(2), abs=1e-4)  # policy == reference at step 0
    assert np.mean([m["reward_accuracy"] for m in seen[-3:]]) > 0.5
    assert seen[-1]["reward_margin"] > 0


def test_reward_model_learns_and_reports_held_out_accuracy(tmp_path, start):
    config = run_config(tmp_path, "rm", "rm_sample.jsonl", steps=15, init_from=str(start))
    stage, held_out = rm_stage(config, StageOptions(eval_fraction=0.2), log=lambda *_: None)
    assert len(held_out["tokens"]) == 8
    seen = []
    result = train(config, stage, on_step=lambda step, m: seen.append(m), log=lambda *_: None)
    assert np.mean([m["loss"] for m in seen[-3:]]) < np.mean([m["loss"] for m in seen[:3]])
    accuracy = reward_accuracy(config.model, result.params, held_out)
    assert 0.0 <= accuracy <= 1.0
    assert set(result.params) == {"backbone", "head"}


def test_stage_cli_and_bad_input(tmp_path, capsys, start):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "x", "output": "y"}) + "\n" + json.dumps({"foo": 1}) + "\n")
    recipe = tmp_path / "r.yaml"
    import yaml
    recipe.write_text(yaml.safe_dump({
        "run_dir": str(tmp_path / "cli"), "model": MODEL,
        "data": {"sources": [{"path": str(bad)}], "tokenizer": str(ASSETS / "demo" / "tokenizer.model"),
                 "seq_len": 64, "on_error": "raise"},
        "optimizer": {"warmup_steps": 0}, "train": {"steps": 2, "batch_size": 8}, "log": {"progress": False, "tensorboard": False, "plot": False},
        "stage": {"truncation": "drop"}}))
    assert cli(["sft", str(recipe)]) == 2
    assert f"{bad}:2: unknown SFT format" in capsys.readouterr().err
    assert cli(["sft", str(recipe), "stage.trunc=drop"]) == 2
    assert "unknown key 'stage.trunc'" in capsys.readouterr().err
    assert cli(["dpo", str(recipe)]) == 2  # no init_from: DPO needs its reference model
    assert "set init_from" in capsys.readouterr().err
    assert cli(["sft", str(recipe), "data.on_error=skip"]) == 0
    assert (tmp_path / "cli" / "checkpoints").is_dir()
    for command in ("sft", "dpo", "rm"):
        with pytest.raises(SystemExit) as exit_info:
            cli([command, "--help"])
        assert exit_info.value.code == 0
