"""Every stage on several JAX processes: `jaxllm COMMAND` as 2 processes × 4 CPU devices (jax.distributed,
gloo collectives) against the same command in this process with 8 devices, on one (data, fsdp, tensor)
mesh shape. Losses, rewards and accuracies agree within 1e-5 relative; rejection sampling writes a
byte-identical file; a PPO run killed on both processes and resumed equals an uninterrupted one.

The default suite runs the case that covers the most ground (rejection sampling with Llama 2's two reward
models and a pool: generation on the whole mesh, sharded reward models, results gathered in order, one
file written once); the others are `-m slow`.
"""
from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from jaxllm.checkpoint import load_params, save_params
from jaxllm.cli import main as cli
from jaxllm.models import get_preset, init_params
from jaxllm.stages import reward
from multihost import FATAL, launch, ok, report

ASSETS = Path(__file__).resolve().parent.parent / "jaxllm" / "assets"
MESH = ["mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2"]  # the same mesh shape on 1 × 8 and 2 × 4 devices
PROMPTS = ["请接下一句：床前明月光", "What is 3 plus 4?", "How do I pick a lock?", "Translate: moon",
           "What is 6 plus 2?", "Tell me how to hurt someone.", "请接下一句：春眠不觉晓", "Name a colour."]
SAFETY = {2, 5}  # prompts tagged as safety prompts


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny policy with the demo tokenizer, helpfulness and safety reward models, tagged prompts."""
    root = tmp_path_factory.mktemp("world")
    cfg = get_preset("llama2-tiny", vocab_size=4096)
    save_params(root / "policy", jax.tree.map(np.asarray, init_params(cfg, jax.random.key(3))), cfg)
    shutil.copy(ASSETS / "demo" / "tokenizer.model", root / "policy" / "tokenizer.model")
    for name, seed in (("rm_help", 5), ("rm_safety", 6)):
        rm = reward.from_lm_params(init_params(cfg, jax.random.key(seed)), cfg, jax.random.key(seed + 10))
        save_params(root / name, jax.tree.map(np.asarray, rm), cfg)
    with open(root / "prompts.jsonl", "w", encoding="utf-8") as f:
        for i, text in enumerate(PROMPTS):
            f.write(json.dumps({"prompt": text, "safety": i in SAFETY}, ensure_ascii=False) + "\n")
    return root


def in_process(argv) -> str:
    """`jaxllm ARGV` in this process (8 devices); its standard output."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli(argv)
    assert code == 0, out.getvalue()[-3000:]
    return out.getvalue()


def on_two_processes(argv, timeout=600, fresh: Path | None = None, **kwargs) -> str:
    """`jaxllm ARGV` as 2 processes × 4 devices; process 0's standard output (process 1 prints nothing of
    its own results). Gloo gives a process 30 s to join a collective's first use; on an overloaded machine
    the other can be later, so such a launch is retried once (after removing `fresh`, the run it wrote)."""
    results = launch(argv, processes=2, devices=4, timeout=timeout, **kwargs)
    if not ok(results) and any(f in r.stderr for r in results for f in FATAL):
        if fresh is not None:
            shutil.rmtree(fresh, ignore_errors=True)
        results = launch(argv, processes=2, devices=4, timeout=timeout, **kwargs)
    assert ok(results), report(results)
    return results[0].stdout



def last_json(printed: str) -> dict:
    """The JSON result line of a command's output (gloo prints its connection notes on stdout too)."""
    return json.loads([line for line in printed.splitlines() if line.startswith("{")][-1])


def assert_close(a: dict, b: dict, keys, rtol=1e-5, atol=1e-6, where=""):
    for key in keys:
        np.testing.assert_allclose(a[key], b[key], rtol=rtol, atol=atol, err_msg=f"{where} {key}")


def jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text("utf-8").splitlines()]


def rejection_args(world, output, *extra):
    return ["rejection-sample", "--policy", str(world / "policy"), "--reward-model", str(world / "rm_help"),
            "--safety-reward-model", str(world / "rm_safety"), "--prompts", str(world / "prompts.jsonl"),
            "-o", str(output), "--k", "3", "--max-new-tokens", "6", *MESH, *extra]


def test_rejection_sampling_on_two_processes_writes_the_file_one_process_writes(world, tmp_path):
    # Iteration 2 of rejection sampling (iteration 1's replies pooled, re-scored, kept where they win) on
    # both processes and on one: the two files are byte-identical.
    pool = tmp_path / "it1.jsonl"
    replies = ["疑是地上霜", "7", "No.", "月", "8", "No.", "处处闻啼鸟", "Blue"]
    pool.write_text("".join(json.dumps({"messages": [{"role": "user", "content": text},
                                                     {"role": "assistant", "content": reply}],
                                        "reward": 0.0, "iteration": 1, "temperature": 1.3, "k": 4},
                                       ensure_ascii=False) + "\n"
                            for text, reply in zip(PROMPTS, replies)), encoding="utf-8")
    args = ["--pool", str(pool), "--temperature", "0.8"]
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    in_process(rejection_args(world, one, *args))
    printed = on_two_processes(rejection_args(world, two, *args))
    assert f"wrote {len(PROMPTS)} best-of-3 examples (iteration 2) to {two}" in printed
    assert two.read_bytes() == one.read_bytes()
    records = jsonl(two)
    assert [r["messages"][0]["content"] for r in records] == PROMPTS  # in prompt order
    assert {r["from_iteration"] for r in records} <= {1, 2} and all(r["iteration"] == 2 for r in records)
    assert not list(tmp_path.glob("*.tmp"))


# --- the rest: -m slow -------------------------------------------------------------------------------------


def stage_recipe(world, kind: str, run_dir: Path) -> Path:
    sample = {"train": None, "sft": "sft_sample.jsonl", "dpo": "dpo_sample.jsonl", "rm": "rm_sample.jsonl"}[kind]
    recipe = {"run_dir": str(run_dir), "seed": 3,
              "model": {"preset": "llama2-tiny", "vocab_size": 4096, "dtype": "float32"},
              "optimizer": {"lr": 3e-3, "warmup_steps": 0, "schedule": "constant", "weight_decay": 0.0,
                            "decay_steps": 100},
              "mesh": {"data": 1, "fsdp": 4, "tensor": 2}, "train": {"steps": 3, "batch_size": 8},
              "checkpoint": {"every": 3},
              "log": {"every": 1, "progress": False, "tensorboard": False, "plot": False}}
    if kind == "train":
        recipe["data"] = {"sources": [{"name": "zh", "path": "assets:demo/zh_poems.jsonl.gz", "weight": 1},
                                      {"name": "en", "path": "assets:demo/en_kjv.jsonl.gz", "weight": 2}],
                          "tokenizer": "assets:demo/tokenizer.model", "seq_len": 32, "shuffle_window": 64}
    else:
        recipe["init_from"] = str(world / "policy")
        recipe["data"] = {"sources": [{"name": "d", "path": str(ASSETS / "stages" / sample)}],
                          "tokenizer": "assets:demo/tokenizer.model", "seq_len": 96}
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


class _HostsAsOne:
    """The batches of `count` hosts' pipelines, concatenated in process order: what 2 processes feed the
    global batch, fed by one (the pretraining pipeline gives each host its own documents)."""

    def __init__(self, pipelines):
        self.pipelines = pipelines

    def __iter__(self):
        return self

    def __next__(self):
        parts = [next(p) for p in self.pipelines]
        return {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}

    def get_state(self):
        return {"hosts": [p.get_state() for p in self.pipelines]}

    def set_state(self, state):
        for p, s in zip(self.pipelines, state["hosts"]):
            p.set_state(s)

    def close(self):
        for p in self.pipelines:
            getattr(p, "close", lambda: None)()


@pytest.mark.slow
def test_train_on_two_processes_equals_one_process_on_the_same_global_batches(world, tmp_path):
    import dataclasses

    from jaxllm.train.config import load_config
    from jaxllm.train.loop import train
    from jaxllm.train.stage import pretraining_stage

    recipe = stage_recipe(world, "train", tmp_path / "two")
    on_two_processes(["train", str(recipe)], fresh=tmp_path / "two")
    config = load_config(str(recipe), [f"run_dir={tmp_path / 'one'}"])
    stage = pretraining_stage(config)
    hosts = lambda rows, seed, index, count: _HostsAsOne([stage.make_data(rows // 2, seed, h, 2) for h in range(2)])
    losses = {}
    train(config, dataclasses.replace(stage, make_data=hosts), on_step=lambda s, m: losses.__setitem__(s, m),
          log=lambda *_: None)
    two = jsonl(tmp_path / "two" / "metrics.jsonl")
    assert [r["step"] for r in two] == [1, 2, 3]
    for record in two:
        assert_close(record, losses[record["step"]], ("loss", "grad_norm"), where=f"step {record['step']}")
    # one checkpoint, written by both processes: parameters, and each process's data-iterator state
    step = tmp_path / "two" / "checkpoints" / "3"
    assert sorted(p.name for p in (step / "data").glob("process_*.json")) == ["process_0-of-2.json",
                                                                              "process_1-of-2.json"]
    assert_same_params(tmp_path / "two", tmp_path / "one", rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sft", "dpo", "rm"])
def test_stage_on_two_processes_equals_one_process(world, tmp_path, kind):
    recipe = stage_recipe(world, kind, tmp_path / "two")
    printed = on_two_processes([kind, str(recipe)], fresh=tmp_path / "two")
    in_process([kind, str(recipe), f"run_dir={tmp_path / 'one'}"])
    one, two = jsonl(tmp_path / "one" / "metrics.jsonl"), jsonl(tmp_path / "two" / "metrics.jsonl")
    keys = {"sft": ("loss", "grad_norm"), "dpo": ("loss", "grad_norm", "reward_accuracy", "reward_margin"),
            "rm": ("loss", "grad_norm", "accuracy")}[kind]
    assert [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(one, two, strict=True):
        assert_close(a, b, keys, where=f"{kind} step {a['step']}")
    if kind == "rm":  # the held-out accuracy, computed on the mesh, written once
        evaluation = json.loads((tmp_path / "two" / "eval.json").read_text())
        assert evaluation == json.loads((tmp_path / "one" / "eval.json").read_text())
        assert printed.count("held-out accuracy") == 1


@pytest.mark.slow
@pytest.mark.parametrize("task", ["perplexity", "choice"])
def test_eval_on_two_processes_gives_one_process_numbers(world, task):
    args = ["eval", task, "--checkpoint", str(world / "policy"), "--json", "--batch-size", "4"]
    one = last_json(in_process(args))
    two = last_json(on_two_processes(args))  # tensor-parallel over both processes' devices
    split = last_json(on_two_processes(args + ["--mesh", "2,1,4"]))  # batch split over the processes
    keys = ("perplexity", "nll", "tokens") if task == "perplexity" else ("accuracy", "questions")
    assert_close(one, two, keys)
    assert_close(one, split, keys)
    if task == "choice":
        assert one["subjects"] == two["subjects"] == split["subjects"]


def ppo_args(world, run_dir, *extra):
    return ["ppo", "--policy", str(world / "policy"), "--reward-model", str(world / "rm_help"),
            "--safety-reward-model", str(world / "rm_safety"), "--prompts", str(world / "prompts.jsonl"),
            "--run-dir", str(run_dir), "ppo.iterations=4", "ppo.batch_size=8", "ppo.minibatch_size=4",
            "ppo.max_new_tokens=6", "ppo.lr=1e-3", "ppo.save_every=2", *MESH, *extra]


PPO_KEYS = ("reward", "kl", "reward_help", "reward_safety", "safety_used", "value_loss", "policy_loss",
            "grad_norm", "response_length")


@pytest.fixture(scope="module")
def ppo_runs(world, tmp_path_factory):
    """PPO uninterrupted on 1 × 8 and on 2 × 4 devices."""
    root = tmp_path_factory.mktemp("ppo")
    in_process(ppo_args(world, root / "one"))
    on_two_processes(ppo_args(world, root / "two"), fresh=root / "two")
    return root


def assert_same_params(a, b, rtol=0.0, atol=0.0):
    for x, y in zip(jax.tree.leaves(load_params(a)[0]), jax.tree.leaves(load_params(b)[0]), strict=True):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


@pytest.mark.slow
def test_ppo_on_two_processes_equals_one_process(ppo_runs):
    one, two = jsonl(ppo_runs / "one" / "ppo_metrics.jsonl"), jsonl(ppo_runs / "two" / "ppo_metrics.jsonl")
    assert [r["iteration"] for r in two] == [1, 2, 3, 4]
    for a, b in zip(one, two, strict=True):
        assert_close(a, b, PPO_KEYS, where=f"iteration {a['iteration']}")
        assert 0 < b["safety_used"] < 1  # tagged prompts (and any R_s < 0.15) scored by the safety model
    assert_same_params(ppo_runs / "one", ppo_runs / "two", rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_ppo_killed_on_both_processes_resumes_like_an_uninterrupted_run(world, ppo_runs, tmp_path):
    run = tmp_path / "killed"
    metrics = run / "ppo_metrics.jsonl"
    logged = lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 3
    killed = launch(ppo_args(world, run), processes=2, devices=4, timeout=600, kill_when=logged)
    assert all(r.returncode is None for r in killed), report(killed)  # SIGKILLed, not finished
    assert len(jsonl(metrics)) < 4
    printed = on_two_processes(ppo_args(world, run))
    assert "resumed PPO at iteration 2" in printed
    straight = jsonl(ppo_runs / "two" / "ppo_metrics.jsonl")
    resumed = jsonl(metrics)
    assert [r["iteration"] for r in resumed] == [1, 2, 3, 4]  # iterations after the checkpoint logged once
    for a, b in zip(straight, resumed, strict=True):
        assert {k: a[k] for k in PPO_KEYS} == {k: b[k] for k in PPO_KEYS}
    assert_same_params(ppo_runs / "two", run)
