"""`jaxllm rejection-sample` resumes: a run SIGKILLed part-way, run again, writes the bytes an uninterrupted
run writes (finished units of prompts are committed whole beside the output and skipped on the rerun)."""
import os
import signal
import subprocess
import sys
from pathlib import Path

from jaxllm.cli import main as cli
from tiny_chain import KILLER, save_policy_and_reward_model



def test_a_sigkilled_rejection_sample_run_again_writes_the_same_bytes(tmp_path, capsys, monkeypatch):
    cfg, policy_dir, rm_dir = save_policy_and_reward_model(tmp_path)
    args = ["rejection-sample", "--policy", str(policy_dir), "--reward-model", str(rm_dir), "--k", "2",
            "--max-new-tokens", "4", "rejection.batch_size=4"]  # 2 prompts per unit

    straight = tmp_path / "straight.jsonl"
    assert cli(args + ["-o", str(straight)]) == 0
    assert not Path(f"{straight}.parts").exists()  # the units are gone once the output is written

    resumed = tmp_path / "resumed.jsonl"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                                         os.environ.get("PYTHONPATH", "")])}
    killed = subprocess.run([sys.executable, "-c", KILLER, *args, "-o", str(resumed)], capture_output=True, text=True,
                            timeout=600, env=env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not resumed.exists()
    parts = sorted(p.name for p in Path(f"{resumed}.parts").iterdir())
    assert parts == ["0.json", "1.json", "lock", "run.json"]  # the killed run's lock, taken over by the rerun
    capsys.readouterr()
    from jaxllm.train import engine
    committed, commit = [], engine.Shards.commit
    monkeypatch.setattr(engine.Shards, "commit", lambda self, i, r: (committed.append(i), commit(self, i, r)))
    assert cli(args + ["-o", str(resumed)]) == 0
    assert committed == [2, 3, 4, 5]  # the two finished units are read back, not sampled again
    assert resumed.read_bytes() == straight.read_bytes()
    assert "wrote" in capsys.readouterr().out
