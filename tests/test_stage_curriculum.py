"""Ziya's easy-to-hard SFT curriculum: `jaxllm data curriculum` ranks conversations by a model's loss on
their replies, then chained `jaxllm sft` runs each start from the previous one."""
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from jaxllm.checkpoint import load_params, save_params
from jaxllm.cli import main as cli
from jaxllm.models import forward, get_preset, init_params
from jaxllm.stages.curriculum import split_stages
from jaxllm.stages.data import encode_sft
from jaxllm.stages.stages import load_stage_recipe, sft_stage
from jaxllm.tokenizer import Tokenizer, get_chat_template
from jaxllm.train.loss import lm_loss, token_nll
from jaxllm.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = str(ROOT / "jaxllm" / "assets" / "demo" / "tokenizer.model")
SAMPLE = ROOT / "jaxllm" / "assets" / "stages" / "sft_sample.jsonl"


def test_split_stages_is_sorted_and_balanced():
    scores = np.asarray([3.0, 1.0, 2.0, 1.0, 5.0, 0.5, 4.0])
    parts = split_stages(scores, 3)
    assert [p.tolist() for p in parts] == [[1, 3, 5], [0, 2], [4, 6]]
    with pytest.raises(ValueError, match="7 examples cannot fill 8 stages"):
        split_stages(scores, 8)


@pytest.mark.slow
def test_curriculum_splits_by_loss_and_chained_sft_runs_start_from_each_other(tmp_path, capsys):
    cfg = get_preset("llama2-tiny", vocab_size=4096)
    start = tmp_path / "start"
    save_params(start, jax.tree.map(np.asarray, init_params(cfg, jax.random.key(7))), cfg)
    out = tmp_path / "curriculum"
    args = ["data", "curriculum", str(SAMPLE), "--checkpoint", str(start), "--tokenizer", TOKENIZER,
            "--template", "ziya", "--stages", "2", "--seq-len", "96", "--mesh", "none", "-o", str(out)]
    assert cli(args) == 0, capsys.readouterr().err
    assert "stage1.jsonl" in capsys.readouterr().out
    scores = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    easy = [s["loss"] for s in scores if s["stage"] == 1]
    hard = [s["loss"] for s in scores if s["stage"] == 2]
    assert (len(easy), len(hard)) == (21, 20) and max(easy) <= min(hard)
    # the records are written unchanged, each once
    lines = SAMPLE.read_text("utf-8").splitlines()
    written = [line for k in (1, 2) for line in (out / f"stage{k}.jsonl").read_text("utf-8").splitlines()]
    assert sorted(written) == sorted(json.dumps(json.loads(x), ensure_ascii=False) for x in lines)
    # a score is the model's mean loss per reply token
    tok = Tokenizer.load(TOKENIZER)
    ids, mask, labels = encode_sft([out / "stage2.jsonl"], tok, get_chat_template("ziya"), 96)[0][0]
    logits = forward(cfg, load_params(start, cfg)[0], jnp.asarray(ids[None, :-1]))
    nll = np.asarray(token_nll(logits, jnp.asarray(labels[None, 1:])))[0]
    first_hard = next(s for s in scores if s["stage"] == 2)
    assert first_hard["loss"] == pytest.approx(float((nll * mask[1:]).sum() / mask[1:].sum()), rel=1e-4)
    assert cli(args) == 2 and "exists: pass --overwrite" in capsys.readouterr().err
    assert cli(args[:-2] + ["--stages", "50", "-o", str(tmp_path / "c2")]) == 2
    assert "41 usable conversations cannot fill 50 stages" in capsys.readouterr().err

    # the chain: stage 1 from the start checkpoint, stage 2 from stage 1's run (ziya-13b-sft's sequence)
    recipe = tmp_path / "ziya-tiny-sft.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"preset": "llama2-tiny", "vocab_size": 4096},
        "data": {"sources": [{"name": "sft", "path": str(out / "stage1.jsonl")}], "tokenizer": TOKENIZER,
                 "seq_len": 96},
        "optimizer": {"lr": 3e-3, "warmup_steps": 0, "schedule": "constant"}, "train": {"steps": 2, "batch_size": 8},
        "log": {"every": 1, "progress": False, "tensorboard": False, "plot": False},
        "checkpoint": {"async_save": False}, "stage": {"template": "ziya"}}))
    runs = [tmp_path / "sft-1", tmp_path / "sft-2"]
    assert cli(["sft", str(recipe), f"run_dir={runs[0]}", f"init_from={start}"]) == 0
    assert cli(["sft", str(recipe), f"data.sources.0.path={out / 'stage2.jsonl'}", f"run_dir={runs[1]}",
                f"init_from={runs[0]}"]) == 0
    assert f"initialised from {runs[0]}" in capsys.readouterr().out
    # stage 2's first step saw stage 1's final parameters: its logged loss is theirs on its first batch
    config, options = load_stage_recipe(str(recipe), [f"data.sources.0.path={out / 'stage2.jsonl'}"])
    batch = next(sft_stage(config, options, log=lambda *_: None).make_data(8, config.seed, 0, 1))
    after_one = load_params(runs[0], config.model)[0]
    expected = float(lm_loss(config.model)(after_one, {k: jnp.asarray(v) for k, v in batch.items()}, None)[0])
    assert read_metrics(runs[1] / "metrics.jsonl")[0]["loss"] == pytest.approx(expected, rel=1e-4)
    assert yaml.safe_load((runs[1] / "config.yaml").read_text())["init_from"] == str(runs[0])
