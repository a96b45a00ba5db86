"""The profiler: a window of training steps, and `generate --profile`, leave traces TensorBoard's profile tab
lists (RUN/tb/plugins/profile/<run>/*.xplane.pb) and that parse; PPO's in tests/test_ppo_engine.py."""
import gzip
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxllm.checkpoint import save_params
from jaxllm.cli import main as cli
from jaxllm.config import ConfigError
from jaxllm.models import get_preset, init_params
from jaxllm.train.profile import parse_window, trace_files

DATA = Path(__file__).parent / "data"


def check_trace(log_dir: Path, program: str) -> None:
    """One profile run under `log_dir` whose xplane and Perfetto files parse and show `program` running."""
    runs = {p.parent for p in trace_files(log_dir)}
    assert len(runs) == 1, trace_files(log_dir)
    (xplane,) = sorted(next(iter(runs)).glob("*.xplane.pb"))
    data = jax.profiler.ProfileData.from_file(str(xplane))
    names = {e.name for plane in data.planes for line in plane.lines for e in line.events}
    assert any(program in n for n in names), sorted(names)[:20]
    (perfetto,) = sorted(next(iter(runs)).glob("perfetto_trace.json.gz"))
    assert json.loads(gzip.decompress(perfetto.read_bytes()))


def test_parse_window():
    assert parse_window("3:5") == (3, 5) and parse_window(None) is None
    for bad in ("5", "5:3", "a:b", "-1:2"):
        with pytest.raises(ConfigError, match="train.profile must be START:STOP"):
            parse_window(bad)


def test_generate_profile(tmp_path, capsys):
    directory = tmp_path / "tiny"
    cfg = get_preset("llama2-tiny", vocab_size=32000, max_position_embeddings=128)
    save_params(directory, jax.tree.map(np.asarray, init_params(cfg, jax.random.key(0))), cfg)
    shutil.copy(DATA / "llama2-32k.model", directory / "tokenizer.model")
    assert cli(["generate", "--checkpoint", str(directory), "--prompt", "Hello", "--max-new-tokens", "4",
                "--temperature", "0", "--mesh", "none", "--profile", str(tmp_path / "prof")]) == 0
    assert f"profile written to {tmp_path / 'prof'}" in capsys.readouterr().out
    check_trace(tmp_path / "prof", "prefill")


def test_train_profile_window(tmp_path):
    from test_train_loop import tiny_config

    from jaxllm.train.loop import train

    run_dir = tmp_path / "run"
    result = train(tiny_config(run_dir, train={"steps": 4, "profile": "1:3"}), log=lambda *_: None)
    assert result.step == 4 and result.exit_code == 0
    check_trace(run_dir / "tb", "jit")
    # the window is part of the recorded config, and a later segment may change it
    assert "profile: '1:3'" in (run_dir / "config.yaml").read_text()
