"""SFT / DPO / RM stages on the one train loop: masking, resume, learning signal, CLI."""
import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import yaml

from jaxllm.checkpoint import load_params, save_params
from jaxllm.cli import main as cli
from jaxllm.config import ConfigError
from jaxllm.models import forward, get_preset, init_params
from jaxllm.stages.data import encode_sft, pack_examples
from jaxllm.stages.stages import (StageOptions, dpo_stage, load_stage_recipe, reward_accuracy, rm_stage,
                                  sft_stage)
from jaxllm.tokenizer import Tokenizer, get_chat_template
from jaxllm.data import SourceConfig
from jaxllm.train.config import build_section, load_config
from jaxllm.train.loop import train
from jaxllm.train.loss import lm_loss, token_nll

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


def quiet(*_):
    pass


# Each stage's reference run, shared by the learning and the resume tests: from the `start` checkpoint,
# checkpoints every 5 steps (a killed run resumes from one). SFT and DPO mix a second, weighted source, so
# the kill-and-resume test covers the mixture's state too.
RUNS = {"sft": ("sft_sample.jsonl", 12, 3e-3, StageOptions()),
        "dpo": ("dpo_sample.jsonl", 12, 2e-3, StageOptions(beta=0.5, mix_by="examples")),
        "rm": ("rm_sample.jsonl", 15, 3e-3, StageOptions(eval_fraction=0.2))}
SECOND_SOURCE = {"sft": {"name": "en", "path": str(ASSETS / "stages" / "sft_en.jsonl"), "weight": 0.25},
                 "dpo": {"name": "rated", "path": str(ASSETS / "stages" / "rm_sample.jsonl"), "weight": 0.5}}


def stage_config(tmp_path, kind, start, name=None):
    sample, steps, lr, _ = RUNS[kind]
    config = run_config(tmp_path, name or kind, sample, steps=steps, init_from=str(start))
    if kind in SECOND_SOURCE:
        config.data.sources.append(build_section(SourceConfig, SECOND_SOURCE[kind], "data.sources.1"))
    config.optimizer.lr = lr
    config.checkpoint.every = 5
    return config


def make_stage(kind, config):
    options = RUNS[kind][3]
    if kind == "rm":
        return rm_stage(config, options, log=quiet)[0]
    return (sft_stage if kind == "sft" else dpo_stage)(config, options, log=quiet)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, start):
    """reference(kind) → (config, TrainResult, per-step metrics) of the uninterrupted run, made once."""
    done = {}

    def get(kind):
        if kind not in done:
            config = stage_config(tmp_path_factory.mktemp(kind), kind, start)
            seen = []
            result = train(config, make_stage(kind, config), on_step=lambda step, m: seen.append(m), log=quiet)
            done[kind] = (config, result, seen)
        return done[kind]
    return get


# The kill-and-resume path is the training loop's, shared by every stage: SFT runs by default, DPO (whose
# reference log-probabilities are recomputed on resume) and RM with `pytest -m slow`.
@pytest.mark.parametrize("kind", ["sft", pytest.param("dpo", marks=pytest.mark.slow),
                                  pytest.param("rm", marks=pytest.mark.slow)])
def test_stage_resumes_a_killed_run_bit_identically(tmp_path, start, reference, kind):
    _, straight, _ = reference(kind)
    config = stage_config(tmp_path, kind, start, name="killed")

    def crash(step, batch):
        if step == 8:  # after the checkpoint at step 5, before the one at 10
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        train(config, make_stage(kind, config), on_batch=crash, log=quiet)
    messages = []
    resumed = train(config, make_stage(kind, config), log=messages.append)
    assert any("resumed" in m and "step 5" in m for m in messages)
    assert resumed.step == straight.step == config.train.steps
    for x, y in zip(jax.tree.leaves(straight.params), jax.tree.leaves(resumed.params), strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    if kind in SECOND_SOURCE:  # the realised mixture is in the metrics, and a resume continues its counts
        from jaxllm.train.metrics import read_metrics
        key = f"data/mix/{SECOND_SOURCE[kind]['name']}"
        final = [read_metrics(r.run_dir / "metrics.jsonl")[-1] for r in (straight, resumed)]
        assert 0 < final[0][key] < 0.5 and final[0][key] == final[1][key]


def _assistant_loss(config, params, rows):
    """Mean loss over every assistant token of the packed sample (the SFT objective)."""
    logits = jax.jit(lambda p: forward(config.model, p, rows["tokens"], rows["positions"], rows["segment_ids"]))(params)
    nll = np.asarray(token_nll(logits, jnp.asarray(rows["targets"])))
    return float((nll * rows["loss_mask"]).sum() / rows["loss_mask"].sum())


def test_sft_lowers_the_assistant_token_loss(reference, start):
    config, result, seen = reference("sft")
    early, late = np.mean([m["loss"] for m in seen[:3]]), np.mean([m["loss"] for m in seen[-3:]])
    examples, _ = encode_sft([ASSETS / "stages" / "sft_sample.jsonl"], Tokenizer.load(config.data.tokenizer),
                             get_chat_template("llama2-chat"), config.data.seq_len)
    rows = pack_examples(examples, config.data.seq_len)
    before = _assistant_loss(config, load_params(start, config.model)[0], rows)
    after = _assistant_loss(config, result.params, rows)
    print(f"\n  SFT assistant-token loss: steps 1-3 {early:.3f} → steps {len(seen) - 2}-{len(seen)} {late:.3f}; "
          f"whole sample {before:.3f} → {after:.3f} after {len(seen)} steps")
    assert late < early - 0.5
    assert after < before - 0.5


def test_dpo_raises_reward_accuracy_above_chance(reference):
    _, _, seen = reference("dpo")
    assert seen[0]["loss"] == pytest.approx(np.log(2), abs=1e-4)  # policy == reference at step 0
    accuracy = np.mean([m["reward_accuracy"] for m in seen[-3:]])
    print(f"\n  DPO reward accuracy (last 3 steps): {accuracy:.3f}; margin {seen[-1]['reward_margin']:.3f}")
    assert accuracy > 0.5
    assert seen[-1]["reward_margin"] > 0


def test_reward_model_learns_and_beats_chance_on_held_out_pairs(reference, start):
    config, result, seen = reference("rm")
    stage, held_out = rm_stage(config, RUNS["rm"][3], log=quiet)
    assert len(held_out["tokens"]) == 8
    assert np.mean([m["loss"] for m in seen[-3:]]) < np.mean([m["loss"] for m in seen[:3]])
    accuracy = reward_accuracy(config.model, result.params, held_out)
    print(f"\n  RM held-out accuracy: {accuracy:.3f} on {len(held_out['tokens'])} pairs")
    assert accuracy > 0.5
    # The backbone starts as the starting checkpoint minus its LM head; the run's config keeps init_from.
    lm, _ = load_params(start, config.model)
    from jaxllm import sharding
    mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
    shardings = sharding.tree_shardings(stage.param_axes, jax.eval_shape(stage.init_params, jax.random.key(0)), mesh)
    initial = stage.load_params(jax.random.key(0), shardings)  # read onto the mesh, outside jit
    assert initial["backbone"]["layers"]["mlp"]["gate"].sharding == shardings["backbone"]["layers"]["mlp"]["gate"]
    assert set(initial) == {"backbone", "head"} and set(lm) - set(initial["backbone"]) == {"lm_head"}
    for path, leaf in jax.tree_util.tree_leaves_with_path(initial["backbone"]):
        expected = lm
        for key in path:
            expected = expected[key.key]
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(expected))
    saved = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    assert saved["init_from"] == str(start)


def test_rm_eval_fraction_that_leaves_no_training_pair_is_a_config_error(tmp_path, start):
    config = run_config(tmp_path, "rm-all-held", "rm_sample.jsonl", init_from=str(start))
    with pytest.raises(ConfigError, match=r"stage.eval_fraction=0.99 holds out 40 of the 40 preference pairs"):
        rm_stage(config, StageOptions(eval_fraction=0.99), log=quiet)


def test_stage_recipes_load():
    for name in ("sft-demo", "dpo-demo", "rm-demo", "llama2-7b-sft", "llama2-7b-rm", "baichuan2-7b-sft",
                 "ctllm-2b-dpo"):
        config, options = load_stage_recipe(name)
        assert config.data.sources and options.truncation in ("truncate", "drop"), name
        assert config.stage == dataclasses.asdict(options), name
    assert load_stage_recipe("llama2-7b-sft")[0].train.epochs == 2  # spec §3.3
    assert load_stage_recipe("baichuan2-7b-sft")[0].train.epochs == 4  # spec §6.6


def test_epochs_count_the_packed_rows_and_stage_options_are_part_of_the_run(tmp_path):
    """train.epochs=2 on the SFT sample: steps = ceil(2 × packed rows / batch), the schedule's length too;
    a rerun with another DPO β (a stage option) is refused like any other config change."""
    from jaxllm.train.config import resolve_epochs
    from jaxllm.train.rundir import RunDirError, prepare

    config = run_config(tmp_path, "epochs", "sft_sample.jsonl", train={"epochs": 2, "batch_size": 4},
                        optimizer={"lr": 1e-3, "warmup_steps": 0})
    assert config.optimizer.decay_steps is None  # pinned once the rows are known
    stage = sft_stage(config, StageOptions(), log=quiet)
    resolve_epochs(config, stage.num_rows)
    assert config.train.steps == -(-2 * stage.num_rows // 4) and config.optimizer.decay_steps == config.train.steps
    with pytest.raises(ConfigError, match="train.epochs needs a stage that knows its rows"):
        resolve_epochs(run_config(tmp_path, "x", "sft_sample.jsonl", train={"epochs": 1}), None)

    recipe = tmp_path / "dpo.yaml"
    recipe.write_text(run_config(tmp_path, "dpo-run", "dpo_sample.jsonl").to_yaml())
    first, _ = load_stage_recipe(str(recipe), ["stage.beta=0.1"])
    prepare(first.run_dir, first)
    again, _ = load_stage_recipe(str(recipe), ["stage.beta=0.1"])
    prepare(again.run_dir, again)
    other, _ = load_stage_recipe(str(recipe), ["stage.beta=0.5"])
    with pytest.raises(RunDirError, match=r"stage.beta: 0.1 → 0.5"):
        prepare(other.run_dir, other)


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
    capsys.readouterr()
    # flags and overrides mix in any order, as in the help's examples
    assert cli(["sft", str(recipe), "--run-dir", str(tmp_path / "other"), "data.seq_len=32", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["run_dir"] == str(tmp_path / "other") and printed["data"]["seq_len"] == 32
    assert cli(["rm", str(recipe), f"data.sources.0.path={ASSETS / 'stages' / 'rm_sample.jsonl'}",
                "stage.eval_fraction=0.99"]) == 2
    assert "stage.eval_fraction=0.99 holds out 40 of the 40 preference pairs" in capsys.readouterr().err
    for command in ("sft", "dpo", "rm"):
        with pytest.raises(SystemExit) as exit_info:
            cli([command, "--help"])
        assert exit_info.value.code == 0
