"""The run directory: RUN/config.yaml (the resolved config), RUN/checkpoints, RUN/tokenizer.model,
RUN/metrics.jsonl, RUN/tb/, RUN/loss.png. A directory is never reused by a run with another config."""
from __future__ import annotations

import shutil
from pathlib import Path

import jax
import yaml

from jaxllm.config import ConfigError
from jaxllm.train.config import RunConfig, config_differences


class RunDirError(ConfigError):
    """The run directory belongs to another run."""


def prepare(run_dir: str | Path, config: RunConfig) -> Path:
    """Create RUN (or check that RUN/config.yaml describes the same run) and write the resolved config.

    Differences in cadence, display, mesh or run length are allowed (they are recorded); any other is
    refused with the list of differing keys."""
    run_dir = Path(run_dir)
    path = run_dir / "config.yaml"
    new = config.to_dict()
    if path.exists():
        try:
            saved = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise RunDirError(f"{path}: unreadable ({err}); move it away to reuse {run_dir}") from None
        diffs = config_differences(saved, new)
        if diffs:
            shown = "; ".join(diffs[:6]) + (f"; … ({len(diffs)} differences)" if len(diffs) > 6 else "")
            hint = ""
            if any(d.startswith("optimizer.decay_steps:") for d in diffs):
                hint = (f" To train longer on the same schedule, keep optimizer.decay_steps="
                        f"{saved.get('optimizer', {}).get('decay_steps')}.")
            raise RunDirError(f"run directory {run_dir} holds a run with a different config ({shown}). "
                              f"Choose another run_dir=… or remove {run_dir} to start over.{hint}")
    elif (run_dir / "checkpoints").exists() and any((run_dir / "checkpoints").iterdir()):
        raise RunDirError(f"run directory {run_dir} has checkpoints but no config.yaml; refusing to train "
                          f"into it (choose another run_dir=…)")
    if jax.process_index() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".yaml.tmp")
        tmp.write_text(config.to_yaml(), encoding="utf-8")
        tmp.replace(path)
    return run_dir


def copy_tokenizer(run_dir: str | Path, tokenizer_path: str | Path) -> Path:
    target = Path(run_dir) / "tokenizer.model"
    if jax.process_index() == 0 and Path(tokenizer_path).resolve() != target.resolve():
        shutil.copyfile(tokenizer_path, target)
    return target


def copy_model_files(run_dir: str | Path, tokenizer_path: str | Path | None, init_from: str | Path | None) -> None:
    """The starting model's files besides weights: the tokenizer's HF files (added tokens, add_bos_token)
    and the HF remote code of `init_from`, so that an export of the run is the model users loaded."""
    if jax.process_index() == 0:
        from jaxllm.convert.carried import copy_model_files as copy

        copy(run_dir, tokenizer_path, init_from)
