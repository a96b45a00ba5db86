"""EleutherAI's lm-evaluation-harness in-process: `JaxllmLM` answers its three request types with the model
on the mesh `jaxllm eval` uses. lm-eval is an optional extra (`pip install 'jaxllm[eval]'`); importing this
module without it raises ModuleNotFoundError.

- loglikelihood: `scoring.loglikelihoods` (context and continuation tokenised together, batched longest
  first so a batch shares a length bucket), so a task written like `jaxllm eval choice`'s prompt gets the
  same numbers;
- loglikelihood_rolling: the text after BOS in windows of the model's positions that overlap by one token
  (as `jaxllm eval perplexity` splits documents);
- generate_until: `inference.generate`, greedy unless the task asks for sampling, cut at the task's stop
  strings."""
from __future__ import annotations

import difflib
import functools
import re

import jax
from lm_eval.api.model import LM

from jaxllm.eval.scoring import loglikelihoods, sequence_token_scores
from jaxllm.inference import SamplingParams, generate
from jaxllm.inference.stops import find_stop


class HarnessError(ValueError):
    """A task lm-eval does not know, or options it cannot run."""


class JaxllmLM(LM):
    def __init__(self, config, params, tokenizer, *, mesh=None, batch_size: int = 8, max_length: int | None = None):
        super().__init__()
        self.config, self.params, self.tok, self.mesh = config, params, tokenizer, mesh
        self.batch_size = batch_size
        self.max_length = max_length or config.max_position_embeddings

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return loglikelihoods(self.config, self.params, self.tok, [r.args[:2] for r in requests], self.batch_size,
                              self.mesh, self.max_length)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for n, request in enumerate(requests):
            ids = [self.tok.bos_id] + self.tok.encode(request.args[0])
            for start in range(0, max(len(ids) - 1, 1), self.max_length - 1):
                window = ids[start:start + self.max_length]
                if len(window) > 1:
                    windows.append(window)
                    owner.append(n)
        totals = [0.0] * len(requests)
        for n, (logp, _) in zip(owner, sequence_token_scores(self.config, self.params, windows, self.batch_size,
                                                             self.mesh)):
            totals[n] += float(logp.sum())
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out: list = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for n, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(n)
        for members in groups.values():
            kwargs = dict(requests[members[0]].args[1])
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", 256))
            sample = kwargs.pop("do_sample", False)
            temperature = float(kwargs.pop("temperature", 1.0 if sample else 0.0)) if sample else 0.0
            sampling = SamplingParams(temperature=temperature, top_p=float(kwargs.pop("top_p", 1.0)),
                                      max_new_tokens=max_new)
            keep = max(self.max_length - max_new, 1)
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                prompts = [self.tok.encode(requests[n].args[0], bos=self.tok.add_bos)[-keep:] for n in chunk]
                result = generate(self.config, self.params, prompts, sampling, jax.random.key(0),
                                  stop_ids=[self.tok.eos_id], pad_id=self.tok.pad_id, mesh=self.mesh,
                                  stop_strings=until, decode=self.tok.decode, vocab_limit=self.tok.vocab_size)
                for n, ids in zip(chunk, result.tokens):
                    text = self.tok.decode([i for i in ids if i != self.tok.eos_id])
                    cut = find_stop(text, until) if until else None
                    out[n] = text if cut is None else text[:cut]
        return out


@functools.lru_cache(maxsize=4)
def _manager(include_path: str | None, include_defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def task_manager(tasks: list[str], include_path: str | None = None):
    """lm-eval's task index for `tasks`: `include_path`'s YAMLs alone when they define every one, else with
    lm-eval's own ~15k tasks too (indexing those takes seconds; one index per process). A task neither
    defines is a HarnessError naming it."""
    if include_path:
        local = _manager(str(include_path), False)
        if all(task in local.all_tasks for task in tasks):
            return local
    manager = _manager(str(include_path) if include_path else None, True)
    known = set(manager.all_tasks)
    for task in tasks:
        if task not in known:
            words = [w for w in re.split(r"[_\-.]", task) if len(w) >= 3]  # difflib over ~15k names is slow
            close = difflib.get_close_matches(task, [k for k in known if any(w in k for w in words)], n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise HarnessError(f"unknown lm-eval task {task!r}{hint}; --include-path DIR adds task YAMLs")
    return manager


def run(lm: JaxllmLM, tasks: list[str], *, num_fewshot: int | None = None, include_path=None,
        limit: int | None = None, log_samples: bool = False) -> dict:
    """lm-eval's `simple_evaluate` on `tasks` (names lm-eval knows, or defined in `include_path`'s YAMLs):
    its "results" (metrics per task), "n-shot", and with `log_samples` each request's responses."""
    from lm_eval import simple_evaluate

    manager = task_manager(tasks, include_path)
    output = simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                             log_samples=log_samples, bootstrap_iters=0)
    keep = {"results": output["results"], "n-shot": output.get("n-shot", {})}
    if log_samples:
        keep["samples"] = {task: [{"doc_id": s["doc_id"], "target": s["target"],
                                   "resps": [[list(r) if isinstance(r, tuple) else r for r in rs]
                                             for rs in s["resps"]]} for s in samples]
                           for task, samples in output["samples"].items()}
    return keep
