"""lm-evaluation-harness tasks from local files, for running the real harness against `jaxllm serve` with no
hub access: a task is a YAML file beside its data (`dataset_path: json` with `data_files`), loaded through
`lm_eval.tasks.TaskManager(include_path=directory)`; a tokenizer is a local Hugging Face directory made from
a sentencepiece model (`hf_tokenizer`).

    manager = TaskManager(include_path=str(write_multiple_choice_task(tmp, "tiny_mc", items)))
    lm_eval.simple_evaluate(model="local-completions", tasks=["tiny_mc"], task_manager=manager,
                            model_args=f"base_url={url}/v1/completions,tokenizer={hf_tokenizer(tmp, model)},...")
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path


def _write(directory: Path, name: str, items: list[dict], task: str) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / f"{name}.jsonl"
    data.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items))
    head = (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
            f"test_split: test\n")
    (directory / f"{name}.yaml").write_text(head + task)
    return directory


def write_multiple_choice_task(directory, name: str, items: list[dict]) -> Path:
    """A `multiple_choice` task over items {"question": str, "choices": [str], "answer": int}: the context
    is the question, each continuation " " + a choice (the harness's target delimiter), scored by the
    log-likelihood of the continuation; metric acc. Returns the directory to include."""
    return _write(directory, name, items, 'output_type: multiple_choice\ndoc_to_text: "{{question}}"\n'
                  'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
                  "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")


def write_generate_task(directory, name: str, items: list[dict], *, max_gen_toks: int = 8,
                        until: tuple[str, ...] = ("\n",)) -> Path:
    """A `generate_until` task over items {"question": str, "answer": str}: greedy generation from the
    question until a stop string or `max_gen_toks`; metric exact_match. Returns the directory to include."""
    return _write(directory, name, items, 'output_type: generate_until\ndoc_to_text: "{{question}}"\n'
                  'doc_to_target: "{{answer}}"\ngeneration_kwargs:\n'
                  f"  until: {json.dumps(list(until))}\n  max_gen_toks: {max_gen_toks}\n  do_sample: false\n"
                  "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")


def hf_tokenizer(directory, sentencepiece_model, *, add_bos: bool = False) -> str:
    """A local Hugging Face tokenizer directory (LlamaTokenizer, no EOS added; BOS with `add_bos`, as jaxllm
    encodes a Llama prompt) for a sentencepiece model: what the harness's `tokenizer=` loads with
    AutoTokenizer instead of a hub name."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(sentencepiece_model, directory / "tokenizer.model")
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": add_bos, "add_eos_token": False, "bos_token": "<s>",
        "eos_token": "</s>", "unk_token": "<unk>"}))
    return str(directory)


def start_server(args: list[str], log: Path, within: float = 600):
    """`jaxllm serve ARGS` as a subprocess (stderr to `log`), once it listens: the process with `.url`, `.log`
    and `.lines` (its stdout, kept being read: a full pipe of access-log lines would stall the server)."""
    command = [sys.executable, "-m", "jaxllm.cli", "serve", *args]
    with open(log, "w") as err:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, text=True)
    url, deadline = None, time.monotonic() + within
    while url is None and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        if "listening on " in line:
            url = line.split("listening on ")[1].strip()
    if url is None:
        proc.kill()
        raise RuntimeError(f"the server did not start:\n{log.read_text()[-3000:]}")
    proc.url, proc.log, proc.lines = url, log, []
    threading.Thread(target=lambda: proc.lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()
    return proc
