"""Rejection sampling and PPO on a tiny model with a synthetic reward, and the commands end to end."""
import json

import jax
import numpy as np
import pytest

from jaxllm.inference import SamplingParams
from jaxllm.models import get_preset, init_params
from jaxllm.rlhf.ppo import PPOConfig, ppo
from jaxllm.rlhf.rejection import best_of_k, reward_vs_k

TARGET = 5


def count_target(rows):
    """+1 per occurrence of TARGET among the response tokens."""
    return ((rows["targets"] == TARGET) * rows["response_mask"]).sum(axis=1).astype(np.float32)


@pytest.fixture(scope="module")
def policy():
    cfg = get_preset("llama2-tiny", vocab_size=32)
    return cfg, init_params(cfg, jax.random.key(0))


PROMPTS = [[1, 7, 9], [1, 3], [1, 11, 12, 13], [1, 2]]


def test_rejection_sampling_keeps_the_argmax_reward_sample(policy):
    cfg, params = policy
    sampling = SamplingParams(temperature=1.0, max_new_tokens=8)
    results = best_of_k(cfg, params, PROMPTS, count_target, k=6, sampling=sampling, rng=jax.random.key(1))
    assert len(results) == len(PROMPTS)
    for prompt, (ids, best, scores) in zip(PROMPTS, results):
        assert best == max(scores) and len(scores) == 6
        assert best == sum(t == TARGET for t in ids)  # the kept sample really has that reward
    table = reward_vs_k([s for _, _, s in results])
    assert [r["k"] for r in table] == list(range(1, 7))
    assert all(a["max"] <= b["max"] for a, b in zip(table, table[1:]))  # best-of-k never decreases with k


def run(policy, beta, iterations=8):
    cfg, params = policy
    ppo_cfg = PPOConfig(iterations=iterations, batch_size=16, minibatch_size=8, epochs=2, lr=1e-2, beta=beta,
                        max_new_tokens=12, whiten_scores=False, weight_decay=0.0)
    _, _, history = ppo(cfg, params, PROMPTS, count_target, ppo_cfg, log=lambda *_: None)
    return history


def test_ppo_raises_a_synthetic_reward_and_a_large_beta_holds_the_policy_at_the_reference(policy):
    free = run(policy, beta=0.0)
    early = np.mean([h["reward"] for h in free[:2]])
    late = np.mean([h["reward"] for h in free[-2:]])
    print(f"\n  PPO synthetic reward (+1 per token {TARGET}): {early:.2f} → {late:.2f} per response")
    assert late > early + 0.5
    held = run(policy, beta=50.0)
    assert max(h["kl"] for h in held[1:]) < 0.5 * max(h["kl"] for h in free[1:])
    assert np.mean([h["reward"] for h in held[-2:]]) < late
    for key in ("reward", "kl", "clip_fraction", "value_loss", "response_length"):
        assert all(np.isfinite(h[key]) for h in free)


def test_ppo_config_errors():
    from jaxllm.config import ConfigError
    with pytest.raises(ConfigError, match="not a multiple of ppo.minibatch_size"):
        PPOConfig(batch_size=10, minibatch_size=4).validate()


def test_rejection_sample_and_ppo_commands(tmp_path, capsys):
    import shutil
    from pathlib import Path

    import yaml

    from jaxllm.checkpoint import load_params, save_params
    from jaxllm.cli import main as cli

    assets = Path(__file__).resolve().parent.parent / "jaxllm" / "assets"
    cfg = get_preset("llama2-tiny", vocab_size=4096)
    policy_dir = tmp_path / "policy"
    save_params(policy_dir, jax.tree.map(np.asarray, init_params(cfg, jax.random.key(3))), cfg)
    shutil.copy(assets / "demo" / "tokenizer.model", policy_dir / "tokenizer.model")
    recipe = tmp_path / "rm.yaml"
    recipe.write_text(yaml.safe_dump({
        "run_dir": str(tmp_path / "rm"), "init_from": str(policy_dir), "model": {"preset": "llama2-tiny", "vocab_size": 4096},
        "data": {"sources": [{"path": str(assets / "stages" / "rm_sample.jsonl")}],
                 "tokenizer": str(assets / "demo" / "tokenizer.model"), "seq_len": 64},
        "optimizer": {"warmup_steps": 0}, "train": {"steps": 2, "batch_size": 8},
        "log": {"progress": False, "tensorboard": False, "plot": False}}))
    assert cli(["rm", str(recipe)]) == 0
    assert "held-out accuracy" in capsys.readouterr().out
    out = tmp_path / "best.jsonl"
    assert cli(["rejection-sample", "--policy", str(policy_dir), "--reward-model", str(tmp_path / "rm"), "--k", "2",
                "--max-new-tokens", "4", "-o", str(out)]) == 0
    assert "mean max reward" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 12 and all(r["messages"][1]["role"] == "assistant" for r in rows)
    assert cli(["ppo", "--policy", str(policy_dir), "--reward-model", str(tmp_path / "rm"), "--run-dir",
                str(tmp_path / "ppo"), "ppo.iterations=2", "ppo.batch_size=4", "ppo.minibatch_size=2",
                "ppo.max_new_tokens=4", "ppo.lr=1e-4"]) == 0
    assert len((tmp_path / "ppo" / "ppo_metrics.jsonl").read_text().splitlines()) == 2
    assert (tmp_path / "ppo" / "ppo.png").is_file()
    params, _ = load_params(tmp_path / "ppo")  # the PPO policy loads like any checkpoint
    assert params["embedding"].shape == (4096, 64)
    assert cli(["ppo", "--policy", str(policy_dir), "--reward-model", str(tmp_path / "rm"), "--run-dir",
                str(tmp_path / "ppo2"), "ppo.itertions=2"]) == 2
    assert "unknown setting 'ppo.itertions=2'" in capsys.readouterr().err
    assert cli(["rejection-sample", "--policy", str(policy_dir), "--reward-model", str(policy_dir), "-o",
                str(out)]) == 2
    assert "not a reward model checkpoint" in capsys.readouterr().err
