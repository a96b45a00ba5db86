"""`jaxllm rejection-sample` locks its output's units (OUTPUT.parts/, like a run directory): a second command
writing the same output while the first holds it exits 2 with one line, as `jaxllm train` does on a held
run directory, and touches nothing."""
import json
import os
import subprocess
import sys
from pathlib import Path


from jaxllm.train import rundir
from tiny_chain import save_policy_and_reward_model

ROOT = Path(__file__).resolve().parent.parent


def test_a_second_rejection_sample_into_a_held_output_is_refused_in_one_line(tmp_path):
    cfg, policy_dir, rm_dir = save_policy_and_reward_model(tmp_path)
    output = tmp_path / "best.jsonl"
    parts = Path(f"{output}.parts")
    held = rundir.lock(parts)  # the first command, still sampling into OUTPUT.parts (this process holds it)
    try:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        second = subprocess.run([sys.executable, "-m", "jaxllm.cli", "rejection-sample", "--policy", str(policy_dir),
                                 "--reward-model", str(rm_dir), "--k", "2", "--max-new-tokens", "2", "-o", str(output)],
                                capture_output=True, text=True, timeout=600, env=env)
        assert second.returncode == 2, second.stderr[-3000:]
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1, second.stderr[-3000:]
        assert lines[0].startswith(f"jaxllm rejection-sample: error: run directory {parts} is in use by pid "
                                   f"{os.getpid()} on "), lines[0]
        assert not output.exists()
        assert sorted(p.name for p in parts.iterdir()) == ["lock"]  # no units, no run.json: nothing touched
        assert json.loads((parts / "lock").read_text())["token"] == held.token  # still the first command's
    finally:
        held.release()
    assert not (parts / "lock").exists()
