"""`jaxllm eval harness`: lm-evaluation-harness in-process on a jaxllm model. A local task written like
`jaxllm eval choice`'s C-Eval prompt gets the same accuracy and the same per-item log-likelihoods."""
import json
import os
import sys
import tempfile

import pytest

os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="jaxllm-test-datasets-"))
pytest.importorskip("lm_eval")

from evalfiles import CEVAL_SUBJECT, CEVAL_VAL, write_ceval, write_ceval_task, write_tiny_checkpoint  # noqa: E402
import jaxllm.eval  # noqa: E402
from jaxllm.cli import main as cli  # noqa: E402
from jaxllm.eval.harness import JaxllmLM  # noqa: E402
from jaxllm.tokenizer import Tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory, config, params = write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")
    return directory, config, params, Tokenizer.load(directory / "tokenizer.model")


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    return write_ceval_task(tmp_path_factory.mktemp("tasks"))


def test_harness_equals_eval_choice_on_the_same_items(tiny, tasks, tmp_path, capsys):
    directory = str(tiny[0])
    out = tmp_path / "harness.json"
    assert cli(["eval", "harness", "--checkpoint", directory, "--tasks", "jaxllm_ceval_tiny", "--include-path",
                str(tasks), "--num-fewshot", "2", "--mesh", "none", "--batch-size", "3", "--output", str(out),
                "--log-samples"]) == 0
    assert "jaxllm_ceval_tiny" in capsys.readouterr().out
    harness = json.loads(out.read_text())
    root = write_ceval(tmp_path / "ceval")
    choice = tmp_path / "choice.json"
    assert cli(["eval", "choice", "--checkpoint", directory, str(root), "--subjects", CEVAL_SUBJECT, "--shots", "2",
                "--mesh", "none", "--output", str(choice)]) == 0
    choice = json.loads(choice.read_text())
    assert harness["results"]["jaxllm_ceval_tiny"]["acc,none"] == choice["average"]["accuracy"]
    samples = sorted(harness["samples"]["jaxllm_ceval_tiny"], key=lambda s: s["doc_id"])
    assert len(samples) == len(CEVAL_VAL) == len(choice["items"])
    for sample, item in zip(samples, choice["items"]):
        assert [r[0][0] for r in sample["resps"]] == pytest.approx(item["scores"], abs=1e-4)


def test_rolling_and_generate_requests(tiny):
    from lm_eval.api.instance import Instance

    _, config, params, tok = tiny
    lm = JaxllmLM(config, params, tok, batch_size=2, max_length=16)
    text = "Language models predict the next token, one piece at a time, from left to right."
    ids = tok.encode(text)
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    # the whole text after BOS, scored in windows of 16 positions: the same as perplexity's windows
    from jaxllm.eval.scoring import sequence_token_logprobs
    seq = [tok.bos_id] + ids
    windows = [seq[i:i + 16] for i in range(0, len(seq) - 1, 15)]
    assert rolling[0] == pytest.approx(sum(float(lp.sum()) for lp in sequence_token_logprobs(
        config, params, windows)), abs=1e-4)
    out = lm.generate_until([Instance("generate_until", {}, ("Hello", {"until": ["\n"], "max_gen_toks": 4}), 0),
                             Instance("generate_until", {}, ("你好", {"until": ["\n"], "max_gen_toks": 4}), 1)])
    assert len(out) == 2 and all(isinstance(o, str) and "\n" not in o for o in out)


def test_harness_errors_one_line(tiny, tasks, monkeypatch, capsys):
    directory = str(tiny[0])
    assert cli(["eval", "harness", "--checkpoint", directory, "--tasks", "jaxllm_ceval_tiny,no_such_task_xyz",
                "--include-path", str(tasks)]) == 2
    err = capsys.readouterr().err
    assert "unknown lm-eval task 'no_such_task_xyz'" in err and err.count("\n") == 1
    # without lm-eval installed: one line naming the extra
    for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "jaxllm.eval.harness")
    monkeypatch.delattr(jaxllm.eval, "harness")
    assert cli(["eval", "harness", "--checkpoint", directory, "--tasks", "x"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'jaxllm[eval]'" in err and err.count("\n") == 1
