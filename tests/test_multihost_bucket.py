"""Multi-host without a shared disk: `jaxllm COMMAND` as 2 processes × 4 CPU devices, each process with its
own working directory, HOME and TMPDIR (fresh at every launch) and its own XLA cache, the bucket (the GCS
emulator) the only place they share: recipe copies aside, the run directory, checkpoints, models, corpus,
tokenizer and prompts live there. Each run is SIGKILLed on both processes after a checkpoint, started
again, and must end where one uninterrupted single-process run ends, with one metrics file written once,
one checkpoint tree per step, and nothing of the run left on the processes' own disks.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from jaxllm import storage
from jaxllm.checkpoint import load_params
from multihost import FATAL, ROOT, launch, ok, report
from test_multihost import MESH, PPO_KEYS, PROMPTS, SAFETY, _HostsAsOne, assert_close, in_process
from tiny_chain import save_policy_and_reward_model

ASSETS = Path(__file__).resolve().parent.parent / "jaxllm" / "assets"
# What a process may leave on its own disk: TensorBoard's local event files (uploaded on every write) and
# matplotlib's font cache; anything else (a local checkpoint, a "gs:" folder, a lock) is a bug.
ALLOWED = {"cwd": (r"recipe\.yaml",), "home": (r"\.config/matplotlib/.*", r"\.cache/matplotlib/.*"),
           "tmp": (r"jaxllm-tb-[^/]+/events\.out\.tfevents\..*",)}


class Hosts:
    """Per-process places for each launch: root/launch-N/process-I/{cwd,home,tmp}; the XLA cache of process
    I (root/xla-I) outlives launches, as a machine's disk would. `extra`: more variables for every process."""

    def __init__(self, root: Path, count: int = 2):
        self.root, self.count, self.launches, self.extra = root, count, [], {}

    def new_launch(self) -> list[Path]:
        n = len(self.launches)
        dirs = [self.root / f"launch-{n}" / f"process-{i}" for i in range(self.count)]
        for d in dirs:
            for sub in ALLOWED:
                (d / sub).mkdir(parents=True)
        self.launches.append(dirs)
        return dirs

    def env(self, i: int, d: Path) -> dict:
        # the suite's shared scratch dirs (conftest) are not this host's: back to the HOME defaults
        return {**self.extra, "HOME": str(d / "home"), "TMPDIR": str(d / "tmp"),
                "JAX_COMPILATION_CACHE_DIR": str(self.root / f"xla-{i}"), "MPLCONFIGDIR": "", "IPYTHONDIR": "",
                "JUPYTER_CONFIG_DIR": "", "JUPYTER_DATA_DIR": "", "JUPYTER_RUNTIME_DIR": ""}

    def assert_clean(self) -> None:
        """Nothing but ALLOWED on any process's disk, in any launch."""
        for dirs in self.launches:
            for d in dirs:
                for sub, patterns in ALLOWED.items():
                    found = [p.relative_to(d / sub).as_posix() for p in (d / sub).rglob("*") if p.is_file()]
                    stray = [f for f in found if not any(re.fullmatch(p, f) for p in patterns)]
                    assert not stray, f"{d / sub}: {stray}"


def on_two_hosts(hosts: Hosts, argv, recipe: dict | None = None, kill_when=None, redo=None, timeout=600):
    """`jaxllm ARGV` on 2 processes that share only the bucket (`recipe`: written into each one's working
    directory as recipe.yaml). With `kill_when`, both are SIGKILLed once it holds. A launch that gloo's
    30 s join limit failed (overloaded machine) is retried once, after `redo()` cleared what it wrote."""
    for attempt in range(2):
        dirs = hosts.new_launch()
        for d in dirs:
            if recipe is not None:
                (d / "cwd" / "recipe.yaml").write_text(yaml.safe_dump(recipe))
        results = launch(argv, processes=hosts.count, devices=4, timeout=timeout, kill_when=kill_when,
                         cwd=[d / "cwd" for d in dirs], env=[hosts.env(i, d) for i, d in enumerate(dirs)])
        if attempt == 0 and any(f in r.stderr for r in results for f in FATAL):
            if redo is not None:
                redo()
            continue
        if kill_when is None:
            assert ok(results), report(results)
        else:  # SIGKILLed, not finished
            assert all(r.returncode is None for r in results), report(results)
        return results
    raise AssertionError("unreachable")


def every(seconds: float, condition):
    """`condition`, checked at most every `seconds` (each check is a request to the emulator)."""
    last = [0.0]

    def check():
        if time.monotonic() - last[0] < seconds:
            return False
        last[0] = time.monotonic()
        return condition()
    return check


def lines(path) -> list[dict]:
    return [json.loads(line) for line in storage.read_text(path).splitlines()] if storage.exists(path) else []


def steps_in(directory) -> list[int]:
    """The checkpoint trees at DIRECTORY; anything else there but model.json is a stray write."""
    names = storage.listdir(directory)
    stray = [n for n in names if not n.isdigit() and n != "model.json"]
    assert not stray, f"{directory}: {stray}"
    return sorted(int(n) for n in names if n.isdigit())


def assert_same_params(a, b, rtol=1e-4, atol=1e-6):
    (x, _), (y, _) = load_params(a), load_params(b)
    import jax

    for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol)


@pytest.fixture
def bucket(gcs):
    """The bucket, holding the demo corpus and tokenizer (nothing reads them from the package)."""
    for name in ("zh_poems.jsonl.gz", "en_kjv.jsonl.gz", "tokenizer.model"):
        storage.copy(ASSETS / "demo" / name, f"{gcs}/corpus/{name}")
    return gcs


# --- train -------------------------------------------------------------------------------------------------

TRAIN_STEPS = 6


def train_recipe(bucket, run_dir) -> dict:
    return {"run_dir": str(run_dir), "seed": 3,
            "model": {"preset": "llama2-tiny", "vocab_size": 4096, "dtype": "float32"},
            "data": {"sources": [{"name": "zh", "path": f"{bucket}/corpus/zh_poems.jsonl.gz", "weight": 1},
                                 {"name": "en", "path": f"{bucket}/corpus/en_kjv.jsonl.gz", "weight": 2}],
                     "tokenizer": f"{bucket}/corpus/tokenizer.model", "seq_len": 32, "shuffle_window": 64},
            "optimizer": {"lr": 3e-3, "warmup_steps": 0, "schedule": "constant", "weight_decay": 0.0,
                          "decay_steps": 100},
            "mesh": {"data": 1, "fsdp": 4, "tensor": 2}, "train": {"steps": TRAIN_STEPS, "batch_size": 8},
            "checkpoint": {"every": 3},
            "log": {"every": 1, "progress": False, "tensorboard": True, "plot": True}}


@pytest.mark.slow
def test_train_killed_on_both_hosts_resumes_from_the_bucket_like_one_process(bucket, tmp_path):
    import dataclasses

    from jaxllm.train.config import from_dict
    from jaxllm.train.loop import train
    from jaxllm.train.stage import pretraining_stage

    run = f"{bucket}/runs/train"
    recipe = train_recipe(bucket, run)
    hosts = Hosts(tmp_path / "hosts")
    metrics = f"{run}/metrics.jsonl"
    # killed once step 3's save is final (orbax's marker in a bucket): somewhere in steps 4-6 or the save of 6
    committed = every(0.3, lambda: storage.exists(f"{run}/checkpoints/3/commit_success.txt"))
    on_two_hosts(hosts, ["train", "recipe.yaml"], recipe, kill_when=committed, redo=lambda: storage.rmtree(run, True))
    assert storage.exists(f"{run}/lock") and not storage.exists(f"{run}/checkpoints/6/commit_success.txt")
    killed_at = len(lines(metrics))
    printed = on_two_hosts(hosts, ["train", "recipe.yaml"], recipe)[0].stdout
    assert f"resumed {run} at step 3" in printed and "taking over the lock" in printed, printed[-3000:]

    # the reference: one process fed both hosts' batches, run directory on this machine
    config = from_dict({**recipe, "run_dir": str(tmp_path / "one")})
    stage = pretraining_stage(config)
    both = lambda rows, seed, index, count: _HostsAsOne([stage.make_data(rows // 2, seed, h, 2) for h in range(2)])
    losses = {}
    train(config, dataclasses.replace(stage, make_data=both), on_step=lambda s, m: losses.__setitem__(s, m),
          log=lambda *_: None)
    two = lines(metrics)
    assert [r["step"] for r in two] == list(range(1, TRAIN_STEPS + 1))  # each step once, by one process
    for record in two:
        assert_close(record, losses[record["step"]], ("loss", "grad_norm"), where=f"step {record['step']}")
    assert_same_params(f"{run}/checkpoints", tmp_path / "one" / "checkpoints")
    assert steps_in(f"{run}/checkpoints") == [3, 6] and 3 <= killed_at <= TRAIN_STEPS
    for step in (3, 6):  # one tree per step, written by both: each host's data-iterator state in it
        hosts_state = [n for n in storage.listdir(f"{run}/checkpoints/{step}/data") if n.startswith("process_")]
        assert sorted(hosts_state) == ["process_0-of-2.json", "process_1-of-2.json"]
    assert sorted(storage.listdir(run)) == ["checkpoints", "config.yaml", "loss.png", "metrics.jsonl", "tb",
                                            "tokenizer.model"]  # the lock released, nothing else
    hosts.assert_clean()


# --- sft, rejection-sample, ppo: the models, prompts and data in the bucket too -----------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny policy (with the demo tokenizer) and a reward model grown from it, saved locally (copied into
    each test's bucket)."""
    return save_policy_and_reward_model(tmp_path_factory.mktemp("models"))[1:]


@pytest.fixture
def world(bucket, models):
    """The bucket with the policy, the reward model, tagged prompts and the SFT sample."""
    for name, local in zip(("policy", "rm"), models):
        storage.copytree(local, f"{bucket}/{name}")
    storage.write_atomic(f"{bucket}/prompts.jsonl", "".join(
        json.dumps({"prompt": text, "safety": i in SAFETY}, ensure_ascii=False) + "\n"
        for i, text in enumerate(PROMPTS * 2)))  # 16 prompts
    storage.copy(ASSETS / "stages" / "sft_sample.jsonl", f"{bucket}/sft_sample.jsonl")
    return bucket


SFT_STEPS = 6


def sft_recipe(world, run_dir) -> dict:
    return {"run_dir": str(run_dir), "seed": 3, "init_from": f"{world}/policy",
            "model": {"preset": "llama2-tiny", "vocab_size": 4096, "dtype": "float32"},
            "data": {"sources": [{"name": "d", "path": f"{world}/sft_sample.jsonl"}],
                     "tokenizer": f"{world}/corpus/tokenizer.model", "seq_len": 64},
            "optimizer": {"lr": 3e-3, "warmup_steps": 0, "schedule": "constant", "weight_decay": 0.0,
                          "decay_steps": 100},
            "mesh": {"data": 1, "fsdp": 4, "tensor": 2}, "train": {"steps": SFT_STEPS, "batch_size": 8},
            "checkpoint": {"every": 3}, "log": {"every": 1, "progress": False}}


@pytest.mark.slow
def test_sft_killed_on_both_hosts_resumes_from_the_bucket_like_one_process(world, tmp_path):
    run = f"{world}/runs/sft"
    recipe = sft_recipe(world, run)
    hosts = Hosts(tmp_path / "hosts")
    committed = every(0.3, lambda: storage.exists(f"{run}/checkpoints/3/commit_success.txt"))
    on_two_hosts(hosts, ["sft", "recipe.yaml"], recipe, kill_when=committed, redo=lambda: storage.rmtree(run, True))
    assert storage.exists(f"{run}/lock") and not storage.exists(f"{run}/checkpoints/6/commit_success.txt")
    printed = on_two_hosts(hosts, ["sft", "recipe.yaml"], recipe)[0].stdout
    assert f"resumed {run} at step 3" in printed, printed[-3000:]

    local = tmp_path / "one.yaml"  # the reference: one process, 8 devices, a local run directory
    local.write_text(yaml.safe_dump({**recipe, "run_dir": str(tmp_path / "one")}))
    in_process(["sft", str(local)])
    one, two = lines(tmp_path / "one" / "metrics.jsonl"), lines(f"{run}/metrics.jsonl")
    assert [r["step"] for r in two] == list(range(1, SFT_STEPS + 1))
    for a, b in zip(one, two, strict=True):
        assert_close(a, b, ("loss", "grad_norm"), where=f"sft step {a['step']}")
    assert_same_params(f"{run}/checkpoints", tmp_path / "one" / "checkpoints")
    assert steps_in(f"{run}/checkpoints") == [3, 6]
    assert sorted(storage.listdir(run)) == ["checkpoints", "config.yaml", "loss.png", "metrics.jsonl", "tb",
                                            "tokenizer.model"]
    hosts.assert_clean()


def rejection_args(world, output):
    return ["rejection-sample", "--policy", f"{world}/policy", "--reward-model", f"{world}/rm",
            "--prompts", f"{world}/prompts.jsonl", "-o", output, "--k", "2", "--max-new-tokens", "4",
            "rejection.batch_size=4", *MESH]  # 2 prompts per unit: 8 units


# Imported by every Python process started with HOOK on its path: each committed unit of sampling work is
# named on stderr, so a test sees which units a restarted run computed again.
HOOK = """from jaxllm.train import engine
commit = engine.Shards.commit
def told(self, index, result):
    commit(self, index, result)
    import sys; print(f"committed unit {index}", file=sys.stderr, flush=True)
engine.Shards.commit = told
"""


@pytest.mark.slow
def test_rejection_sample_killed_on_both_hosts_resumes_from_the_bucket_like_one_process(world, tmp_path):
    out = f"{world}/best.jsonl"
    parts = f"{out}.parts"
    units = lambda: [n for n in (storage.listdir(parts) if storage.exists(parts) else []) if n[0].isdigit()]
    hosts = Hosts(tmp_path / "hosts")
    on_two_hosts(hosts, rejection_args(world, out), kill_when=every(0.3, lambda: len(units()) >= 2),
                 redo=lambda: storage.rmtree(parts, True))
    assert not storage.exists(out) and 2 <= len(units()) < 8 and storage.exists(f"{parts}/lock")
    done = sorted(int(n.split(".")[0]) for n in units())
    (tmp_path / "hook" / "sitecustomize.py").parent.mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(HOOK)
    hosts.extra = {"PYTHONPATH": f"{tmp_path / 'hook'}:{ROOT}"}
    again = on_two_hosts(hosts, rejection_args(world, out))
    assert f"wrote {len(PROMPTS) * 2} best-of-2 examples" in again[0].stdout, again[0].stdout[-3000:]
    for r in again:  # both processes skip the units the killed run committed, and only those
        redone = [int(i) for i in re.findall(r"committed unit (\d+)", r.stderr)]
        assert redone == [i for i in range(8) if i not in done], (done, redone)
    one = tmp_path / "one.jsonl"
    in_process(rejection_args(world, str(one)))
    assert storage.read_bytes(out) == one.read_bytes()  # as the multihost test on disk: the same bytes
    assert sorted(storage.listdir(world)) == sorted(["best.jsonl", "corpus", "policy", "prompts.jsonl", "rm",
                                             "sft_sample.jsonl"])  # the units and their lock gone
    hosts.assert_clean()


PPO_ITERATIONS = 4


def ppo_args(world, run_dir):
    return ["ppo", "--policy", f"{world}/policy", "--reward-model", f"{world}/rm", "--prompts",
            f"{world}/prompts.jsonl", "--run-dir", str(run_dir), f"ppo.iterations={PPO_ITERATIONS}",
            "ppo.batch_size=8", "ppo.minibatch_size=4", "ppo.max_new_tokens=6", "ppo.lr=1e-3", "ppo.save_every=2",
            *MESH]


@pytest.mark.slow
def test_ppo_killed_on_both_hosts_resumes_from_the_bucket_like_one_process(world, tmp_path):
    run = f"{world}/runs/ppo"
    hosts = Hosts(tmp_path / "hosts")
    committed = every(0.3, lambda: storage.exists(f"{run}/checkpoints/2/commit_success.txt"))
    on_two_hosts(hosts, ppo_args(world, run), kill_when=committed, redo=lambda: storage.rmtree(run, True))
    assert storage.exists(f"{run}/lock") and not storage.exists(f"{run}/checkpoints/4/commit_success.txt")
    printed = on_two_hosts(hosts, ppo_args(world, run))[0].stdout
    assert "resumed PPO at iteration 2" in printed, printed[-3000:]
    in_process(ppo_args(world, tmp_path / "one"))
    one, two = lines(tmp_path / "one" / "ppo_metrics.jsonl"), lines(f"{run}/ppo_metrics.jsonl")
    assert [r["iteration"] for r in two] == list(range(1, PPO_ITERATIONS + 1))
    keys = [k for k in PPO_KEYS if k in one[0]]
    for a, b in zip(one, two, strict=True):
        assert_close(a, b, keys, where=f"iteration {a['iteration']}")
    assert_same_params(f"{run}/checkpoints", tmp_path / "one" / "checkpoints")
    assert steps_in(f"{run}/checkpoints") == [2, 4]
    # what the local single-process run holds (no lock, nothing a second process added)
    assert sorted(storage.listdir(run)) == sorted(p.name for p in (tmp_path / "one").iterdir())
    hosts.assert_clean()
