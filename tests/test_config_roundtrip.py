"""`--print-config` prints one YAML document that loads back into the same config, for every shipped recipe."""
import subprocess
import sys

import pytest
import yaml

from jaxllm.rlhf.cli import load_recipe, to_yaml
from jaxllm.stages.stages import load_stage_recipe
from jaxllm.train.config import CONFIGS_DIR, load_config

RECIPES = sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml"))


def _command(name: str) -> str:
    words = name.split("-")
    if "ppo" in words:
        return "ppo"
    if "rejection" in words:
        return "rejection"
    return next((w for w in ("sft", "dpo", "rm") if w in words), "train")


def _printed(name: str, recipe: str) -> str:
    kind = _command(name)
    if kind in ("ppo", "rejection"):
        return to_yaml(load_recipe(kind, recipe))
    if kind == "train":
        return load_config(recipe).to_yaml()
    return load_stage_recipe(recipe)[0].to_yaml()


@pytest.mark.parametrize("name", RECIPES)
def test_printed_config_loads_back_the_same(name, tmp_path):
    printed = _printed(name, name)
    assert isinstance(yaml.safe_load(printed), dict)
    again = tmp_path / f"{name}.yaml"
    again.write_text(printed, encoding="utf-8")
    assert _printed(name, str(again)) == printed


def test_sft_print_config_is_one_yaml_document():
    out = subprocess.run([sys.executable, "-m", "jaxllm.cli", "sft", "--print-config", "stage.beta=0.2"],
                         capture_output=True, text=True, check=True).stdout
    data = yaml.safe_load(out)
    assert out.count("\nstage:") == 1 and data["stage"]["beta"] == 0.2 and data["stage"]["template"] is None
