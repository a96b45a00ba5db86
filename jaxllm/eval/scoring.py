"""Log-likelihood scoring with one jitted forward per length bucket, on one device or sharded over a mesh."""
from __future__ import annotations

import csv
import functools
import json
import math
import re
from collections import defaultdict
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.inference.generate import batch_shards, bucket, left_pad, on_mesh

LETTERS = ("A", "B", "C", "D")


def length_bucket(n: int) -> int:
    """The padded length for `n` tokens: a power of two, or three quarters of one from 48 up (1054 tokens
    pad to 1536, not 2048), so a batch wastes at most a third of its positions on padding."""
    full = bucket(n)
    return full * 3 // 4 if full >= 64 and n <= full * 3 // 4 else full


@functools.lru_cache(maxsize=8)
def _token_scores(config):
    from jaxllm.models import forward

    @jax.jit
    def fn(params, tokens, segments):
        logits = forward(config, params, tokens, None, segments)
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        targets = tokens[:, 1:]
        return (jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0],
                jnp.argmax(logits[:, :-1], axis=-1) == targets)
    return fn


def sequence_token_scores(config, params, sequences, batch_size: int = 8, mesh=None):
    """(log p(token_t | tokens_<t), whether token_t is the argmax) for t ≥ 1 of each sequence, right-padded
    into length buckets (float32[len - 1], bool[len - 1] each). With `mesh`, params should already be
    sharded on it; the rows are split over its batch axes (on several hosts, every process passes the same
    sequences and gets every result)."""
    from jaxllm.distributed import to_host
    from jaxllm.sharding import batch_sharding

    rows = batch_size if mesh is None else -(-batch_size // batch_shards(mesh)) * batch_shards(mesh)
    out = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start:start + batch_size]
        length = length_bucket(max(len(s) for s in chunk))
        tokens = np.zeros((rows, length), np.int32)
        segments = np.zeros((rows, length), np.int32)
        for i, s in enumerate(chunk):
            tokens[i, :len(s)] = s
            segments[i, :len(s)] = 1
        with on_mesh(mesh):
            if mesh is not None:
                tokens, segments = jax.device_put((tokens, segments), batch_sharding(mesh))
            logp, greedy = map(to_host, _token_scores(config)(params, tokens, segments))
        out += [(logp[i, :len(s) - 1], greedy[i, :len(s) - 1]) for i, s in enumerate(chunk)]
    return out


@functools.lru_cache(maxsize=8)
def _next_token_scores(config):
    from jaxllm.models import forward

    @jax.jit
    def fn(params, tokens, positions, segments, candidates):
        row = forward(config, params, tokens, positions, segments, last_only=True)[:, -1]  # [rows, vocab]
        logp = jax.nn.log_softmax(row, axis=-1)
        return jnp.take_along_axis(logp, candidates, axis=-1), jnp.argmax(row, axis=-1)
    return fn


def next_token_scores(config, params, contexts, candidates, batch_size: int = 8, mesh=None):
    """For each context (token ids) and its candidate next tokens: (log p(candidate | context) float32[k],
    the argmax token) from one forward of the context, left-padded so the logits are computed at its last
    position only — what MMLU's and CMMLU's code compare for the letters, and 1/k of the work of scoring
    each candidate's sequence."""
    from jaxllm.distributed import to_host
    from jaxllm.sharding import batch_sharding

    rows = batch_size if mesh is None else -(-batch_size // batch_shards(mesh)) * batch_shards(mesh)
    width = max(len(c) for c in candidates)
    out = []
    for start in range(0, len(contexts), batch_size):
        chunk, wanted = contexts[start:start + batch_size], candidates[start:start + batch_size]
        padded = left_pad(chunk + [[0]] * (rows - len(chunk)), length_bucket(max(len(c) for c in chunk)))
        ids = np.zeros((rows, width), np.int32)
        for i, k in enumerate(wanted):
            ids[i, :len(k)] = k
        with on_mesh(mesh):
            if mesh is not None:
                padded = jax.device_put(padded, batch_sharding(mesh))
            logp, best = map(to_host, _next_token_scores(config)(params, *padded, ids))
        out += [(logp[i, :len(k)], int(best[i])) for i, k in enumerate(wanted)]
    return out


def sequence_token_logprobs(config, params, sequences, batch_size: int = 8, mesh=None):
    """log p(token_t | tokens_<t) for t ≥ 1 of each sequence (see `sequence_token_scores`)."""
    return [logp for logp, _ in sequence_token_scores(config, params, sequences, batch_size, mesh)]


def loglikelihoods(config, params, tokenizer, requests, batch_size: int = 8, mesh=None,
                   max_length: int | None = None) -> list[tuple[float, bool]]:
    """For each (context, continuation) pair of strings: (sum of log p over the continuation's tokens, whether
    greedy decoding gives exactly them). Context and continuation are tokenised together, as a model sees
    them; the continuation's tokens are those past their common prefix with the context alone. A sequence
    longer than `max_length` (default: the model's positions) keeps its last tokens. Continuations of one
    token after the same context share one forward (`next_token_scores`); others are whole sequences.
    Either way they run longest first, so a batch's rows share a length bucket; results come back in
    request order."""
    max_length = max_length or config.max_position_embeddings
    contexts: dict[str, list[int]] = {}
    sequences, starts = [], []
    for context, continuation in requests:
        if context not in contexts:
            contexts[context] = tokenizer.encode(context, bos=tokenizer.add_bos)
        prefix = contexts[context]
        ids = tokenizer.encode(context + continuation, bos=tokenizer.add_bos)
        common = next((i for i, (a, b) in enumerate(zip(prefix, ids)) if a != b), min(len(prefix), len(ids)))
        start = min(common, len(ids) - 1)
        if start < 1:  # nothing before the continuation: it is predicted from BOS
            ids, start = [tokenizer.bos_id] + ids, 1
        if len(ids) > max_length:
            cut = len(ids) - max_length
            ids, start = ids[cut:], max(start - cut, 1)
        sequences.append(ids)
        starts.append(start)
    out: list = [None] * len(sequences)
    # One token after an unchanged context (a letter after a prompt): one forward of the context per
    # context scores all its candidates; the rest are scored as whole sequences.
    single: dict[tuple, list[int]] = {}
    for i, (ids, start) in enumerate(zip(sequences, starts)):
        if start == len(ids) - 1:
            single.setdefault(tuple(ids[:-1]), []).append(i)
    grouped = sorted(single.items(), key=lambda kv: -len(kv[0]))
    scores = next_token_scores(config, params, [list(c) for c, _ in grouped],
                               [[sequences[i][-1] for i in members] for _, members in grouped], batch_size, mesh)
    for (_, members), (logp, best) in zip(grouped, scores):
        for i, lp in zip(members, logp):
            out[i] = (float(lp), sequences[i][-1] == best)
    rest = sorted((i for i in range(len(sequences)) if out[i] is None), key=lambda i: -len(sequences[i]))
    scores = sequence_token_scores(config, params, [sequences[i] for i in rest], batch_size, mesh) if rest else []
    for i, (logp, greedy) in zip(rest, scores):
        out[i] = (float(logp[starts[i] - 1:].sum()), bool(greedy[starts[i] - 1:].all()))
    return out


def perplexity(config, params, tokenizer, texts, seq_len: int = 512, batch_size: int = 8, mesh=None) -> dict:
    """exp(mean NLL per token) over documents, each split into windows of at most `seq_len` tokens that
    overlap by one, so every token after a document's first is predicted exactly once (context restarts
    at each window)."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 (a token and the one it predicts), got {seq_len}")
    windows = []
    for text in texts:
        ids = tokenizer.encode(text, bos=tokenizer.add_bos)
        windows += [ids[i:i + seq_len] for i in range(0, max(len(ids) - 1, 1), seq_len - 1)]
    windows = [w for w in windows if len(w) > 1]
    if not windows:
        raise ValueError("no text to score")
    nll = [-lp.sum() for lp in sequence_token_logprobs(config, params, windows, batch_size, mesh)]
    tokens = sum(len(w) - 1 for w in windows)
    return {"tokens": tokens, "nll": float(sum(nll)) / tokens, "perplexity": math.exp(float(sum(nll)) / tokens)}


def continuation_logprobs(config, params, tokenizer, prompt: str, continuations, batch_size: int = 8,
                          mesh=None):
    """Sum of log p over each continuation's tokens after `prompt` (tokenised together, as a model sees it)."""
    prefix = tokenizer.encode(prompt, bos=tokenizer.add_bos)
    sequences, starts = [], []
    for cont in continuations:
        ids = tokenizer.encode(prompt + cont, bos=tokenizer.add_bos)
        common = next((i for i, (a, b) in enumerate(zip(prefix, ids)) if a != b), min(len(prefix), len(ids)))
        sequences.append(ids)
        starts.append(min(common, len(ids) - 1))
    logps = sequence_token_logprobs(config, params, sequences, batch_size, mesh)
    return [float(lp[start - 1:].sum()) for lp, start in zip(logps, starts)]


FIELDS = ("question", *LETTERS, "answer")


def _read_csv(path: Path) -> list[tuple[int, dict]]:
    """C-Eval CSVs have a header (id,question,A,B,C,D,answer[,explanation]); MMLU's have none: each row is
    question,A,B,C,D,answer."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        table = list(csv.reader(f))
    if table and {c.strip().lower() for c in table[0]} >= {name.lower() for name in FIELDS}:
        header = [c.strip() for c in table[0]]
        header = [next((name for name in FIELDS if name.lower() == c.lower()), c) for c in header]
        return [(n, dict(zip(header, r))) for n, r in enumerate(table[1:], 2) if r]
    rows = []
    for n, r in enumerate(table, 1):
        if not r:
            continue
        if len(r) != len(FIELDS):
            raise ValueError(f"{path}:{n}: expected a header with question,A,B,C,D,answer or {len(FIELDS)} "
                             f"columns (question,A,B,C,D,answer, as in MMLU), got {len(r)} columns")
        rows.append((n, dict(zip(FIELDS, r))))
    return rows


def read_questions(path: str | Path, subject: str | None = None) -> list[dict]:
    """C-Eval CSV (with header), MMLU CSV (no header) or jsonl with the fields question, A-D, answer
    (+subject). The subject defaults to the file name without a _test/_val/_dev split suffix."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such question file")
    rows = []
    if path.suffix == ".csv":
        rows = _read_csv(path)
    else:
        for number, line in enumerate(path.read_text("utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append((number, json.loads(line)))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{number}: bad JSON: {err.msg}") from None
    default_subject = re.sub(r"_(test|val|dev)$", "", path.stem)
    questions = []
    for number, row in rows:
        missing = [k for k in FIELDS if not isinstance(row, dict) or k not in row]
        if missing:
            raise ValueError(f"{path}:{number}: missing field '{missing[0]}'")
        answer = str(row["answer"]).strip().upper()
        if answer not in LETTERS:
            raise ValueError(f"{path}:{number}: answer must be one of A-D, got {row['answer']!r}")
        questions.append({"question": str(row["question"]), "options": [str(row[k]) for k in LETTERS],
                          "answer": answer, "subject": row.get("subject") or subject or default_subject})
    if not questions:
        raise ValueError(f"{path}: no questions")
    return questions


def format_question(q: dict) -> str:
    options = "\n".join(f"{letter}. {text}" for letter, text in zip(LETTERS, q["options"]))
    label = "答案：" if any("\u4e00" <= c <= "\u9fff" for c in q["question"]) else "Answer:"
    return f"{q['question']}\n{options}\n{label}"


def choice_accuracy(config, params, tokenizer, questions, batch_size: int = 8, mesh=None) -> dict:
    """Pick the letter with the highest log-likelihood after the formatted question (zero-shot)."""
    per_subject = defaultdict(lambda: [0, 0])
    for q in questions:
        scores = continuation_logprobs(config, params, tokenizer, format_question(q),
                                       [f" {letter}" for letter in LETTERS], batch_size, mesh)
        correct = LETTERS[int(np.argmax(scores))] == q["answer"]
        per_subject[q["subject"]][0] += int(correct)
        per_subject[q["subject"]][1] += 1
    right = sum(c for c, _ in per_subject.values())
    total = sum(n for _, n in per_subject.values())
    return {"accuracy": right / total, "questions": total,
            "subjects": {s: {"accuracy": c / n, "questions": n} for s, (c, n) in sorted(per_subject.items())}}
