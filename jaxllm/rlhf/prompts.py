"""The inputs of PPO and rejection sampling read from files: prompts with Llama 2's safety tag, and the pool
of best replies kept by earlier rejection-sampling iterations."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from jaxllm import storage


def _records(path: Path):
    """(line number, dict) of a jsonl file; a clear error for a line that is not a JSON object."""
    for number, line in enumerate(storage.read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: bad JSON: {err.msg}") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object")
        yield number, record


def read_prompts(path: str | Path) -> tuple[list[str], list[bool]]:
    """(prompt texts, safety tags) from a jsonl of {"prompt": str, "safety": bool (optional, default
    false)} or a text file of one prompt per line (none tagged). A tagged prompt is scored by the safety
    reward model whatever its score (Llama 2 §3.2.3)."""
    file = storage.path(path)  # local, gs:// or s3://
    if not storage.is_file(file):
        raise ValueError(f"{path}: no such prompts file")
    texts, tags = [], []
    if file.suffix in (".jsonl", ".json"):
        for number, record in _records(file):
            if not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
                raise ValueError(f"{path}:{number}: expected {{\"prompt\": \"...\"}} with a non-empty string")
            tag = record.get("safety", False)
            if not isinstance(tag, bool):
                raise ValueError(f"{path}:{number}: 'safety' must be true or false, got {tag!r}")
            texts.append(record["prompt"])
            tags.append(tag)
    else:
        texts = [line for line in storage.read_text(file).splitlines() if line.strip()]
        tags = [False] * len(texts)
    if not texts:
        raise ValueError(f"{path}: no prompts")
    return texts, tags


@dataclasses.dataclass(frozen=True)
class PooledReply:
    """A best reply kept by an earlier rejection-sampling iteration."""
    prompt: str
    reply: str
    iteration: int      # the iteration that sampled it
    where: str          # file:line, for messages
    sampling: tuple = ()  # (key, value) pairs of how it was sampled: temperature, k


def read_pool(paths) -> list[PooledReply]:
    """The replies in earlier `jaxllm rejection-sample` outputs (`messages` records: a user turn and the
    kept assistant reply), each (prompt, reply) once; `iteration` defaults to 1 where a record has none."""
    pool, seen = [], set()
    for path in paths:
        file = storage.path(path)
        if not storage.is_file(file):
            raise ValueError(f"{path}: no such pool file (an earlier rejection-sample output)")
        for number, record in _records(file):
            messages = record.get("messages")
            if (not isinstance(messages, list) or len(messages) != 2
                    or [m.get("role") if isinstance(m, dict) else None for m in messages] != ["user", "assistant"]
                    or not all(isinstance(m.get("content"), str) for m in messages)):
                raise ValueError(f"{path}:{number}: expected a rejection-sample record {{\"messages\": "
                                 f"[{{\"role\": \"user\", ...}}, {{\"role\": \"assistant\", ...}}], ...}}")
            iteration = record.get("from_iteration", record.get("iteration", 1))
            if not isinstance(iteration, int) or isinstance(iteration, bool) or iteration < 1:
                raise ValueError(f"{path}:{number}: 'iteration' must be a positive integer, got {iteration!r}")
            key = (messages[0]["content"], messages[1]["content"])
            if key not in seen:
                seen.add(key)
                sampling = tuple((k, record[k]) for k in ("temperature", "k") if k in record)
                pool.append(PooledReply(*key, iteration, f"{path}:{number}", sampling))
    return pool
