"""`jaxllm train` through the console entry point: a tiny recipe trains, mistakes are one-line errors, an
interrupted run saves and fails whatever happened to its output, a damaged run falls back in one line per
checkpoint, and a run directory has one writer."""
import gzip
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from jaxllm import cli
from test_train_loop import tiny_config

QUIET = ["log.tensorboard=false", "log.progress=false"]


def write_recipe(path, run, **sections):
    path.write_text(tiny_config(run, **sections).to_yaml())
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`jaxllm train` on a tiny recipe: 4 steps, checkpoints at 2 and 4 (stdout as the user saw it)."""
    import contextlib
    import io

    root = tmp_path_factory.mktemp("trained")
    run = root / "run"
    recipe = write_recipe(root / "tiny.yaml", run, train={"steps": 4}, optimizer={"decay_steps": 4})
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["train", str(recipe), *QUIET]) == 0
    return recipe, run, out.getvalue()


def test_train_command_runs_a_recipe_and_reports_its_outputs(trained, capsys):
    recipe, run, out = trained
    assert "done at step 4/4" in out
    for line in (f"checkpoint   {run / 'checkpoints'} (steps [2, 4])", f"metrics      {run / 'metrics.jsonl'}",
                 f"loss curve   {run / 'loss.png'}"):
        assert line in out
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert f"done at step 4/4: loss {records[-1]['loss']:.4g}," in out  # the summary is metrics.jsonl's end
    assert not (run / "lock").exists()  # released with the run

    # rerunning resumes (nothing left to do); another config in the same directory is refused
    assert cli.main(["train", str(recipe), *QUIET]) == 0
    out = capsys.readouterr().out
    assert "resumed" in out and f"done at step 4/4: loss {records[-1]['loss']:.4g}," in out
    assert cli.main(["train", str(recipe), "optimizer.lr=0.5"]) == 2
    err = capsys.readouterr().err
    assert "holds a run with a different config (optimizer.lr: 0.01 → 0.5)" in err


def test_bare_jaxllm_prints_help_and_presets_lists_the_demo(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: jaxllm COMMAND") and "Start with `jaxllm train`" in out
    assert cli.main(["presets"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows["demo"].endswith("demo (jaxllm train)") and "3,147,456" in rows["demo"]
    assert rows["llama2-tiny"].endswith("tiny (tests)") and rows["llama2-7b"].endswith("published")
    assert cli.main(["presets", "--published"]) == 0
    assert "demo" not in capsys.readouterr().out


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "jaxllm.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def test_a_damaged_run_falls_back_in_one_line_per_checkpoint_and_nothing_else(trained, tmp_path):
    """Step 4's array files emptied (orbax's readers then fail by the dozen, each once printing a
    traceback), plus debris of killed saves: the output is one line for the debris, one for the damaged
    step (step, file, cause), then the run's own lines."""
    recipe, source, _ = trained
    run = tmp_path / "run"
    shutil.copytree(source, run)
    for path in (run / "checkpoints" / "4").rglob("d/*"):
        path.write_bytes(b"")
    (run / "checkpoints" / "6.orbax-checkpoint-tmp-99" / "params").mkdir(parents=True)
    moved = write_recipe(tmp_path / "tiny.yaml", run, train={"steps": 4}, optimizer={"decay_steps": 4})
    done = run_cli("train", moved, "train.steps=2", *QUIET)  # step 2 restored: nothing left to train
    assert done.returncode == 0, done.stderr[-3000:]
    lines = (done.stdout + done.stderr).splitlines()
    noise = [line for line in lines if any(word in line for word in ("Traceback", "Event loop", "never retrieved",
                                                                     "Exception ignored", "TensorStore({"))]
    assert noise == [], "\n".join(noise[:20])
    assert [line for line in lines if "6.orbax-checkpoint-tmp-99" in line] == [
        f"removed unfinished checkpoint files in {run / 'checkpoints'}: 6.orbax-checkpoint-tmp-99 (an interrupted "
        f"save)"]
    (damaged,) = [line for line in lines if "step 4" in line and "damaged" in line]
    assert damaged.startswith("warning: checkpoint step 4 is damaged (") and f"{run}/checkpoints/4/" in damaged
    assert damaged.endswith(f"moved to {run}/checkpoints.corrupt/4, resuming from step 2")
    assert "done at step 2/2" in done.stdout


def test_an_interrupted_run_saves_and_fails_even_when_its_output_pipe_is_closed(tmp_path, capsys):
    """`jaxllm train … 2>&1 | tee log`, then Ctrl-C (tee dies too): while it trains, a second `jaxllm train`
    on the run directory is refused in one line naming the holder; then SIGINT with the pipe closed: the run
    saves at the step it reached and exits 130."""
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "long.yaml", run, train={"steps": 10_000}, checkpoint={"every": 10_000},
                          optimizer={"decay_steps": 10_000}, log={"progress": True, "tensorboard": False})
    child = subprocess.Popen([sys.executable, "-m", "jaxllm.cli", "train", str(recipe)], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT)
    watchdog = threading.Timer(240, child.kill)
    watchdog.start()
    try:
        while True:  # until the loop runs and has logged a step
            line = child.stdout.readline().decode(errors="replace")
            assert line or child.poll() is None, "the run ended before training"
            if "steps 0 → 10000" in line:
                break
        metrics = run / "metrics.jsonl"
        while not metrics.exists() or len(metrics.read_text().splitlines()) < 2:
            assert child.poll() is None
            time.sleep(0.2)
        assert cli.main(["train", str(recipe)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"jaxllm train: error: run directory {run} is in use by pid {child.pid} on "
                              f"{socket.gethostname()} (`")
        assert "\n" not in err
        child.stdout.close()  # the reader is gone
        child.send_signal(signal.SIGINT)
        assert child.wait(timeout=180) == 130
    finally:
        watchdog.cancel()
        child.kill()
    logged = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    saved = [int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()]
    assert saved == [logged[-1]] and saved[0] >= 2  # saved where it stopped, its last step logged
    assert not (run / "lock").exists()


def test_a_stage_whose_inputs_fail_leaves_nothing_and_says_what_to_run_first(tmp_path, monkeypatch, capsys):
    """The demos chain (train → sft → dpo / rm): a missing or unsaved starting run names the command that
    writes it, a reward model where a language model is expected says so, and no run directory is made."""
    import jax
    import numpy as np

    from jaxllm.checkpoint import save_params
    from jaxllm.models import get_preset, init_params
    from jaxllm.stages import reward

    monkeypatch.chdir(tmp_path)
    assert cli.main(["sft", *QUIET]) == 2
    assert capsys.readouterr().err.strip() == ("jaxllm sft: error: init_from runs/demo: no such checkpoint; it is "
                                               "written by `jaxllm train`: run that first")
    (tmp_path / "runs" / "sft-demo").mkdir(parents=True)
    (tmp_path / "runs" / "sft-demo" / "config.yaml").write_text("run_dir: runs/sft-demo\n")  # never saved
    assert cli.main(["dpo", *QUIET]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "init_from runs/sft-demo: its run has not saved a checkpoint yet; it is written by `jaxllm sft`: run that "
        "first")
    demo = get_preset("demo")
    save_params("runs/rm-demo", jax.tree.map(np.asarray, reward.from_lm_params(
        init_params(demo, jax.random.key(0)), demo, jax.random.key(1))), demo)
    assert cli.main(["dpo", "--init-from", "runs/rm-demo", *QUIET]) == 2
    assert "error: init_from runs/rm-demo holds a reward model, not a language model" in capsys.readouterr().err
    assert cli.main(["generate", "--checkpoint", "runs/rm-demo", "--prompt", "x"]) == 2
    assert capsys.readouterr().err.strip().startswith(
        "jaxllm generate: error: runs/rm-demo holds a reward model, not a language model")
    assert cli.main(["generate", "--checkpoint", "runs/rm-demo/model.json", "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("is a file; a checkpoint is a directory (with model.json): did you mean runs/rm-demo?")
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["rm-demo", "sft-demo"]


def test_mistakes_are_one_line_errors(tmp_path, capsys):
    assert cli.main(["train", "optimizer.lrr=1"]) == 2
    assert "unknown config key 'optimizer.lrr' (did you mean 'optimizer.lr'?)" in capsys.readouterr().err
    assert cli.main(["train", "lama2-7b-pretrain"]) == 2
    assert "did you mean 'llama2-7b-pretrain'?" in capsys.readouterr().err
    assert cli.main(["train", "data.sources.0.path=/nonexistent/*.jsonl", f"run_dir={tmp_path / 'run'}"]) == 2
    assert "data.sources.0.path: '/nonexistent/*.jsonl' matches no file" in capsys.readouterr().err
    assert cli.main(["train", "mesh.tensor=3", f"run_dir={tmp_path / 'run'}"]) == 2
    assert "mesh: " in capsys.readouterr().err
    cut = tmp_path / "cut.jsonl.gz"  # a corpus whose download stopped half-way
    with gzip.open(cut, "wt") as f:
        f.writelines(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(500))
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    assert cli.main(["train", f"data.sources=[{{path: {cut}}}]", "data.on_error=raise",
                     f"run_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"jaxllm train: error: {cut}: file ends early (truncated) after line ") and "\n" not in err
    assert not (tmp_path / "run").exists()  # a failed start does not claim the run directory


def test_default_is_the_demo_recipe(capsys):
    assert cli.main(["train", "--print-config", "--init-from", "ckpt/x", "train.steps=50"]) == 0
    out = capsys.readouterr().out
    assert "name: demo" in out and "assets:demo/tokenizer.model" in out
    assert "init_from: ckpt/x" in out and "steps: 50" in out
    # options may sit between the recipe and its overrides
    assert cli.main(["train", "demo", "--init-from", "ckpt/x", "train.steps=50", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "name: demo" in out and "assets:demo/tokenizer.model" in out
    assert "init_from: ckpt/x" in out and "steps: 50" in out


def test_a_plain_install_ships_the_recipes_and_the_demo(tmp_path):
    """`pip install jaxllm` (a wheel, not the checkout) must find `jaxllm train`'s demo and every recipe."""
    import shutil
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    from jaxllm.train.config import CONFIGS_DIR
    # A copy, so the build's scratch files stay out of the checkout
    source = tmp_path / "src"
    shutil.copytree(Path(__file__).resolve().parent.parent, source, symlinks=True,
                    ignore=shutil.ignore_patterns(".git", "runs", "build", "*.egg-info", "__pycache__", ".hypothesis"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path / "dist")], check=True, capture_output=True, timeout=300)
    names = set(zipfile.ZipFile(next((tmp_path / "dist").glob("jaxllm-*.whl"))).namelist())
    for recipe in CONFIGS_DIR.glob("*.yaml"):
        assert f"jaxllm/configs/{recipe.name}" in names
    for asset in ("demo/tokenizer.model", "demo/zh_poems.jsonl.gz", "demo/en_kjv.jsonl.gz", "stages/sft_sample.jsonl"):
        assert f"jaxllm/assets/{asset}" in names


@pytest.mark.slow
def test_the_readme_demo_trains_and_its_loss_falls(tmp_path):
    """README command 1, shortened: `jaxllm train` on the shipped corpus; the loss falls visibly."""
    assert cli.main(["train", f"run_dir={tmp_path / 'demo'}", "train.steps=80", "log.tensorboard=false"]) == 0
    records = [json.loads(x) for x in (tmp_path / "demo" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]  # the last record: the demo's final_eval
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.slow
def test_kill_9_at_random_moments_then_a_clean_finish_is_bit_identical(tmp_path):
    """A checkpoint every step, two kept (retention renames and deletes all the time), SIGKILL at random
    moments five times: each restart resumes from a verified step, no debris stays listed, and the finished
    run equals one that was never interrupted."""
    import random

    import jax
    import numpy as np

    from jaxllm.checkpoint import load_params
    from jaxllm.train.loop import train

    sections = dict(train={"steps": 12}, optimizer={"decay_steps": 12}, checkpoint={"every": 1, "keep": 2})
    straight = train(tiny_config(tmp_path / "straight", **sections), log=lambda *_: None)
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "kill.yaml", run, **sections)
    rng = random.Random(0)
    for _ in range(5):
        child = subprocess.Popen([sys.executable, "-m", "jaxllm.cli", "train", str(recipe), *QUIET],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        metrics, deadline = run / "metrics.jsonl", time.time() + 240
        start = len(metrics.read_text().splitlines()) if metrics.exists() else 0
        while (not metrics.exists() or len(metrics.read_text().splitlines()) <= start) and child.poll() is None:
            assert time.time() < deadline
            time.sleep(0.05)
        time.sleep(rng.uniform(0, 1.5))
        child.kill()
        child.wait()
    done = run_cli("train", recipe, *QUIET)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "damaged" not in done.stdout + done.stderr
    listed = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert [int(n) for n in listed if n.isdigit()] == [11, 12]
    assert all(n.isdigit() or n in ("model.json", ".retired") for n in listed), listed  # no debris
    assert not (run / "checkpoints" / ".retired").exists() or not any((run / "checkpoints" / ".retired").iterdir())
    params, _ = load_params(run)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(straight.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
