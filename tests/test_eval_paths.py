"""The three ways to evaluate give the same numbers on the same tiny model and items: `jaxllm eval choice`
(C-Eval's own 2-shot protocol), the harness in-process (`jaxllm eval harness`), and the harness's
`local-completions` model against `jaxllm serve` (prompts as token ids, log-probs from the server's echo)."""
import json
import os
import tempfile

import pytest

os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="jaxllm-test-datasets-"))
lm_eval = pytest.importorskip("lm_eval")

from harness_tasks import hf_tokenizer, start_server  # noqa: E402
from evalfiles import CEVAL_SUBJECT, CEVAL_VAL, write_ceval, write_ceval_task, write_tiny_checkpoint  # noqa: E402
from jaxllm.cli import main as cli  # noqa: E402

TASK = "jaxllm_ceval_tiny"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("paths")
    directory = write_tiny_checkpoint(root / "tiny")[0]
    return directory, write_ceval_task(root / "tasks"), write_ceval(root / "ceval"), root


@pytest.fixture(scope="module")
def server(setup):
    directory, _, _, root = setup
    try:
        proc = start_server(["--checkpoint", str(directory), "--port", "0", "--model-name", "tiny", "--slots", "2",
                             "--max-len", "256", "--mesh", "none"], root / "serve.log")
    except RuntimeError as err:
        pytest.fail(str(err))
    yield proc.url
    proc.terminate()
    proc.wait(60)


def test_eval_choice_harness_and_server_agree(setup, server, tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    directory, tasks, ceval, _ = setup
    choice = tmp_path / "choice.json"
    assert cli(["eval", "choice", "--checkpoint", str(directory), str(ceval), "--subjects", CEVAL_SUBJECT,
                "--shots", "2", "--mesh", "none", "--output", str(choice)]) == 0
    choice = json.loads(choice.read_text())
    harness = tmp_path / "harness.json"
    assert cli(["eval", "harness", "--checkpoint", str(directory), "--tasks", TASK, "--include-path", str(tasks),
                "--num-fewshot", "2", "--mesh", "none", "--output", str(harness), "--log-samples"]) == 0
    harness = json.loads(harness.read_text())

    monkeypatch.setenv("OPENAI_API_KEY", "unused")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tokenizer = hf_tokenizer(tmp_path / "hf-tokenizer", directory / "tokenizer.model", add_bos=True)
    served = lm_eval.simple_evaluate(
        model="local-completions", tasks=[TASK], task_manager=TaskManager(include_path=str(tasks)), num_fewshot=2,
        log_samples=True, cache_requests=False,
        model_args=f"base_url={server}/v1/completions,model=tiny,tokenizer={tokenizer},"
                   "tokenizer_backend=huggingface,add_bos_token=True,batch_size=2,max_retries=1")

    accuracy = choice["average"]["accuracy"]
    assert harness["results"][TASK]["acc,none"] == accuracy == served["results"][TASK]["acc,none"]
    per_item = lambda out: [[r[0][0] for r in s["resps"]] for s in sorted(out["samples"][TASK],
                                                                         key=lambda s: s["doc_id"])]
    assert len(choice["items"]) == len(CEVAL_VAL)
    for item, in_process, through_server in zip(choice["items"], per_item(harness), per_item(served)):
        assert in_process == pytest.approx(item["scores"], abs=1e-4)
        assert through_server == pytest.approx(item["scores"], abs=1e-4)
