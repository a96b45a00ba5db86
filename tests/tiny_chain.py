"""The tiny policy + reward model pair the rejection-sampling and PPO command tests run on, and the
subprocess script that SIGKILLs `jaxllm rejection-sample` once two units are committed."""
import shutil
from pathlib import Path

import jax
import numpy as np

from jaxllm.checkpoint import save_params
from jaxllm.models import get_preset, init_params
from jaxllm.stages import reward

ASSETS = Path(__file__).resolve().parent.parent / "jaxllm" / "assets"

# Kill the process for real once two units are committed (no handler runs, nothing is cleaned up).
KILLER = """import os, signal, sys
from jaxllm.train import engine
commit = engine.Shards.commit
def commit_then_die(self, index, result):
    commit(self, index, result)
    if sum(self._done) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
engine.Shards.commit = commit_then_die
from jaxllm.cli import main
sys.exit(main(sys.argv[1:]))
"""


def save_policy_and_reward_model(root: Path):
    """ROOT/policy (llama2-tiny over the demo tokenizer's 4,096 pieces, with that tokenizer) and ROOT/rm (a
    reward model grown from it); returns (config, policy dir, reward-model dir)."""
    cfg = get_preset("llama2-tiny", vocab_size=4096)
    policy_dir, rm_dir = root / "policy", root / "rm"
    params = init_params(cfg, jax.random.key(3))
    save_params(policy_dir, jax.tree.map(np.asarray, params), cfg)
    shutil.copy(ASSETS / "demo" / "tokenizer.model", policy_dir / "tokenizer.model")
    save_params(rm_dir, jax.tree.map(np.asarray, reward.from_lm_params(params, cfg, jax.random.key(4))), cfg)
    return cfg, policy_dir, rm_dir
