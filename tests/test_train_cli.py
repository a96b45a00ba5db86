"""`jaxllm train` through the console entry point: a tiny recipe trains, mistakes are one-line errors."""
import json

import pytest

from jaxllm import cli
from test_train_loop import tiny_config


def test_train_command_runs_a_recipe_and_reports_its_outputs(tmp_path, capsys):
    run = tmp_path / "run"
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(tiny_config(run).to_yaml())
    assert cli.main(["train", str(recipe), "train.steps=2", "log.tensorboard=false"]) == 0
    out = capsys.readouterr().out
    assert "done at step 2/2" in out
    for line in (f"checkpoint   {run / 'checkpoints'}", f"metrics      {run / 'metrics.jsonl'}",
                 f"loss curve   {run / 'loss.png'}"):
        assert line in out
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]

    # rerunning resumes (nothing left to do); another config in the same directory is refused
    assert cli.main(["train", str(recipe), "train.steps=2", "log.tensorboard=false"]) == 0
    assert "resumed" in capsys.readouterr().out
    assert cli.main(["train", str(recipe), "optimizer.lr=0.5"]) == 2
    err = capsys.readouterr().err
    assert "holds a run with a different config (optimizer.lr: 0.01 → 0.5)" in err


def test_mistakes_are_one_line_errors(tmp_path, capsys):
    assert cli.main(["train", "optimizer.lrr=1"]) == 2
    assert "unknown config key 'optimizer.lrr' (did you mean 'optimizer.lr'?)" in capsys.readouterr().err
    assert cli.main(["train", "lama2-7b-pretrain"]) == 2
    assert "did you mean 'llama2-7b-pretrain'?" in capsys.readouterr().err
    assert cli.main(["train", "data.sources.0.path=/nonexistent/*.jsonl", f"run_dir={tmp_path / 'run'}"]) == 2
    assert "data.sources.0.path: '/nonexistent/*.jsonl' matches no file" in capsys.readouterr().err
    assert cli.main(["train", "mesh.tensor=3", f"run_dir={tmp_path / 'run'}"]) == 2
    assert "mesh: " in capsys.readouterr().err
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
    assert cli.main(["train", f"run_dir={tmp_path / 'demo'}", "train.steps=60", "log.tensorboard=false"]) == 0
    losses = [json.loads(x)["loss"] for x in (tmp_path / "demo" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.7 * losses[0], losses
