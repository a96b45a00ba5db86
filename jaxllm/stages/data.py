"""SFT and preference data: common jsonl formats → chat messages → token ids + loss mask → rows.

SFT rows are packed (several examples per row, segment ids keep them apart); preference rows hold one
(chosen, rejected) pair each, padded, so the two sequences of a pair share a row index.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bot": "assistant", "system": "system"}


class DataFormatError(ValueError):
    """A data line cannot be used; the message names file:line."""


@dataclasses.dataclass
class Stats:
    """Counts reported at the end of loading (and logged by the trainer)."""
    examples: int = 0
    skipped: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    reasons: dict = dataclasses.field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped += 1
        self.reasons[reason] = self.reasons.get(reason, 0) + 1

    def summary(self) -> str:
        why = ", ".join(f"{k}: {v}" for k, v in sorted(self.reasons.items()))
        return (f"{self.examples} examples, {self.skipped} skipped{f' ({why})' if why else ''}, "
                f"{self.truncated} truncated, {self.dropped_too_long} dropped as too long")


def _text(value, field: str) -> str:
    if not isinstance(value, str):
        raise DataFormatError(f"field '{field}' must be a string, got {type(value).__name__}")
    return value


def _message(role: str, content, turn: dict, where: str, field: str = "content") -> dict:
    """{"role", "content"} plus "weight" (0 or 1) where an assistant turn gives one."""
    message = {"role": role, "content": _text(content, f"{where}.{field}")}
    if "weight" in turn:
        if role != "assistant":
            raise DataFormatError(f"{where}.weight: only assistant replies have a weight, this is a {role} turn")
        if turn["weight"] not in (0, 1):
            raise DataFormatError(f"{where}.weight must be 0 (not trained) or 1, got {turn['weight']!r}")
        message["weight"] = int(turn["weight"])
    return message


def to_messages(record: dict) -> list[dict]:
    """One SFT record in any supported format → [{"role", "content"}, ...].

    Formats: Alpaca/BELLE {"instruction", "input"?, "output", "system"?}; ShareGPT {"conversations":
    [{"from": "human"|"gpt"|"system", "value"}]}; OpenAI-style {"messages": [{"role", "content"}]}.
    An assistant turn of the last two may carry OpenAI's `"weight": 0` (context, not trained) or 1.
    """
    if not isinstance(record, dict):
        raise DataFormatError(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        turns = record["messages"]
        if not isinstance(turns, list):
            raise DataFormatError("field 'messages' must be a list")
        messages = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
                raise DataFormatError(f"messages[{i}] needs 'role' and 'content'")
            role = turn["role"]
            if role not in ("system", "user", "assistant"):
                raise DataFormatError(f"messages[{i}].role must be system/user/assistant, got {role!r}")
            messages.append(_message(role, turn["content"], turn, f"messages[{i}]"))
        return messages
    if "conversations" in record:
        turns = record["conversations"]
        if not isinstance(turns, list):
            raise DataFormatError("field 'conversations' must be a list")
        messages = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
                raise DataFormatError(f"conversations[{i}] needs 'from' and 'value'")
            role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
            if role is None:
                raise DataFormatError(f"conversations[{i}].from must be one of "
                                      f"{sorted(SHAREGPT_ROLES)}, got {turn['from']!r}")
            messages.append(_message(role, turn["value"], turn, f"conversations[{i}]", "value"))
        return messages
    if "instruction" in record or "output" in record:
        for field in ("instruction", "output"):
            if field not in record:
                raise DataFormatError(f"Alpaca-style record is missing field '{field}'")
        prompt = _text(record["instruction"], "instruction")
        extra = _text(record.get("input") or "", "input")
        if extra.strip():
            prompt = f"{prompt}\n{extra}"
        messages = [{"role": "user", "content": prompt},
                    {"role": "assistant", "content": _text(record["output"], "output")}]
        if record.get("system"):
            messages.insert(0, {"role": "system", "content": _text(record["system"], "system")})
        return messages
    raise DataFormatError("unknown SFT format: expected 'messages', 'conversations' or "
                          f"'instruction'/'output', got fields {sorted(record)}")


def check_conversation(messages: list[dict]) -> None:
    """Optional system, then user/assistant alternating, ending with an assistant reply; no empty turn."""
    turns = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not turns:
        raise DataFormatError("conversation has no user/assistant turns")
    for i, turn in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if turn["role"] != expected:
            raise DataFormatError(f"turn {i} is '{turn['role']}' but '{expected}' was expected "
                                  f"(turns must alternate user/assistant)")
        if not turn["content"].strip():
            raise DataFormatError(f"turn {i} ({turn['role']}) is empty")
    if turns[-1]["role"] != "assistant":
        raise DataFormatError("conversation must end with an assistant reply")
    if not any(turn.get("weight", 1) for turn in turns[1::2]):
        raise DataFormatError("every assistant reply has weight 0: nothing to train on")


def mask_untrained_replies(mask: list, messages: list[dict]) -> list:
    """The loss mask with the replies of weight 0 zeroed. Every chat template marks a reply (with the
    token that ends it) as one run of ones, so the mask's runs are the replies in order."""
    weights = [m.get("weight", 1) for m in messages if m["role"] == "assistant"]
    if all(weights):
        return mask
    runs: list[list[int]] = []
    for i, value in enumerate(mask):
        if value and runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        elif value:
            runs.append([i, i + 1])
    if len(runs) != len(weights):
        raise DataFormatError(f"cannot tell the {len(weights)} assistant replies apart: the rendered "
                              f"conversation has {len(runs)} trained spans")
    mask = list(mask)
    for (start, end), weight in zip(runs, weights):
        if not weight:
            mask[start:end] = [0] * (end - start)
    return mask


def read_jsonl(path: str | Path, stats: Stats, on_error: str = "skip") -> Iterator[tuple[str, dict]]:
    """Yield ("file:line", record) for each line of a .jsonl or .jsonl.gz file; bad JSON, non-UTF-8 and a
    damaged file are skipped and counted, or raised (the pretraining reader, `jaxllm.data.read_json_lines`)."""
    from jaxllm.data import DataError, read_json_lines
    try:
        yield from read_json_lines(path, on_error=on_error, skip=stats.skip)
    except DataError as err:
        raise DataFormatError(str(err)) from None


def _fail_or_skip(where, err, stats, on_error):
    if on_error == "raise":
        raise DataFormatError(f"{where}: {err}") from None
    stats.skip(str(err).split(":")[0][:60])


def _render(template, tokenizer, messages):
    """(ids, labels, mask) with the template's explicit labels where it has them (Baichuan 2 trains EOS at
    round boundaries), else labels = ids. A conversation the template refuses is a bad record."""
    from jaxllm.tokenizer import TokenizerError

    try:
        if hasattr(template, "render_labels"):
            return template.render_labels(tokenizer, messages)
        ids, mask = template.render(tokenizer, messages)
        return ids, ids, mask
    except TokenizerError as err:
        raise DataFormatError(str(err)) from None


def encode_sft(files: Iterable[str | Path], tokenizer, template, seq_len: int, *,
               truncation: str = "truncate", on_error: str = "skip", stats: Stats | None = None):
    """[(ids, mask, labels)] for every usable conversation (see `pack_examples`). An example longer than
    seq_len + 1 tokens is cut at the end (`truncation="truncate"`, kept if a learnable token remains) or
    dropped; each example counts once: kept (maybe truncated), dropped or skipped. Replies of weight 0
    are context: their mask is 0."""
    stats = stats if stats is not None else Stats()
    examples = [example for _, _, example in sft_records(files, tokenizer, template, seq_len,
                                                           truncation=truncation, on_error=on_error, stats=stats)]
    return examples, stats


def sft_records(files: Iterable[str | Path], tokenizer, template, seq_len: int, *, truncation: str = "truncate",
                on_error: str = "skip", stats: Stats):
    """Yield ("file:line", record, (ids, mask, labels)) for each usable conversation (see `encode_sft`)."""
    if truncation not in ("truncate", "drop"):
        raise ValueError(f"truncation must be 'truncate' or 'drop', got {truncation!r}")
    for path in files:
        for where, record in read_jsonl(path, stats, on_error):
            try:
                messages = to_messages(record)
                check_conversation(messages)
                ids, labels, mask = _render(template, tokenizer, messages)
                mask = mask_untrained_replies(mask, messages)
            except DataFormatError as err:
                _fail_or_skip(where, err, stats, on_error)
                continue
            cut = len(ids) > seq_len + 1
            if cut:
                if truncation == "drop":
                    stats.dropped_too_long += 1
                    continue
                ids, labels, mask = ids[: seq_len + 1], labels[: seq_len + 1], mask[: seq_len + 1]
            if not any(mask[1:]):
                stats.dropped_too_long += 1
                continue
            stats.truncated += cut
            stats.examples += 1
            yield where, record, (np.asarray(ids, np.int32), np.asarray(mask, np.float32),
                                  np.asarray(labels, np.int32))


def pack_examples(examples, seq_len: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """Pack examples, in order, into rows of `seq_len` (next-token form).

    An example is (ids, mask) or (ids, mask, labels) (labels default to ids); of n ids it takes n - 1
    slots: tokens ids[:-1], targets labels[1:], loss_mask mask[1:].
    Returns int32/float32 arrays [rows, seq_len]: tokens, targets, loss_mask, segment_ids, positions.
    """
    rows: list[list[tuple]] = []
    used: list[int] = []
    for example in examples:
        n = len(example[0]) - 1
        if rows and used[-1] + n <= seq_len:
            rows[-1].append(example)
            used[-1] += n
        else:
            rows.append([example])
            used.append(n)
    out = {k: np.zeros((len(rows), seq_len), np.int32) for k in ("tokens", "targets", "segment_ids",
                                                                  "positions")}
    out["tokens"][:] = pad_id
    out["loss_mask"] = np.zeros((len(rows), seq_len), np.float32)
    for r, row in enumerate(rows):
        start = 0
        for seg, (ids, mask, *labels) in enumerate(row, 1):
            labels = labels[0] if labels else ids
            n = len(ids) - 1
            span = slice(start, start + n)
            out["tokens"][r, span] = ids[:-1]
            out["targets"][r, span] = labels[1:]
            out["loss_mask"][r, span] = mask[1:]
            out["segment_ids"][r, span] = seg
            out["positions"][r, span] = np.arange(n)
            start += n
    return out


def encode_preferences(files, tokenizer, template, seq_len: int, *, margins: dict | None = None,
                       on_error: str = "skip", stats: Stats | None = None) -> tuple[dict, Stats]:
    """{"prompt", "chosen", "rejected", "rating"?} records → arrays [pairs, 2, seq_len] (index 0 chosen,
    1 rejected) of tokens/targets/loss_mask/segment_ids/positions, plus `margin` float32[pairs] from the
    rating (Llama 2 margins) and `last` int32[pairs, 2], the index of each sequence's final token.

    `tokens` hold the whole sequence, its final token (EOS) included, so a reward model reads it at `last`;
    targets/loss_mask are the next-token view (the final position has no target).
    `prompt` may be a string or a conversation (list of messages ending with a user turn).
    Pairs longer than seq_len tokens are cut at the end (both sides) and counted.
    """
    stats = stats if stats is not None else Stats()
    pairs, margin_values = [], []
    for path in files:
        for where, record in read_jsonl(path, stats, on_error):
            try:
                if not isinstance(record, dict):
                    raise DataFormatError("expected a JSON object")
                for field in ("prompt", "chosen", "rejected"):
                    if field not in record:
                        raise DataFormatError(f"missing field '{field}'")
                prompt = record["prompt"]
                history = ([{"role": "user", "content": _text(prompt, "prompt")}]
                           if isinstance(prompt, str) else to_messages({"messages": prompt}))
                sides = []
                for field in ("chosen", "rejected"):
                    messages = history + [{"role": "assistant", "content": _text(record[field], field)}]
                    check_conversation(messages)
                    sides.append(_render(template, tokenizer, messages))
                if len(history) > 1 and hasattr(template, "prompt"):
                    # Only the compared reply is learned: earlier replies of a conversation prompt are context.
                    shared = len(template.prompt(tokenizer, history))
                    sides = [(ids, labels, [0] * shared + list(mask[shared:])) for ids, labels, mask in sides]
                rating = record.get("rating")
                if rating is not None and margins is not None and str(rating).lower() not in margins:
                    raise DataFormatError(f"unknown rating {rating!r}; expected one of {sorted(margins)}")
            except DataFormatError as err:
                _fail_or_skip(where, err, stats, on_error)
                continue
            cut = any(len(ids) > seq_len for ids, _, _ in sides)
            if cut:
                sides = [tuple(x[:seq_len] for x in side) for side in sides]
            if not all(any(mask[1:]) for _, _, mask in sides):
                stats.dropped_too_long += 1
                continue
            stats.truncated += cut
            pairs.append(sides)
            margin_values.append(0.0 if rating is None or margins is None else margins[str(rating).lower()])
            stats.examples += 1
    n = len(pairs)
    out = {k: np.zeros((n, 2, seq_len), np.int32) for k in ("tokens", "targets", "segment_ids", "positions")}
    out["loss_mask"] = np.zeros((n, 2, seq_len), np.float32)
    out["last"] = np.zeros((n, 2), np.int32)
    for i, sides in enumerate(pairs):
        for j, (ids, labels, mask) in enumerate(sides):
            k = len(ids)
            out["tokens"][i, j, :k] = ids
            out["targets"][i, j, :k - 1] = labels[1:]
            out["loss_mask"][i, j, :k - 1] = np.asarray(mask[1:], np.float32)
            out["segment_ids"][i, j, :k] = 1
            out["positions"][i, j, :k] = np.arange(k)
            out["last"][i, j] = k - 1
    out["margin"] = np.asarray(margin_values, np.float32)
    return out, stats


def reply_text(ids, tokenizer, template, stop_strings=()) -> str | None:
    """The text of sampled ids without their stop ids (and from a stop string on), or None when SFT could
    not use it: blank, or refused by the chat template (e.g. a Llama 2 tag inside it)."""
    from jaxllm.inference.stops import find_stop
    from jaxllm.tokenizer import TokenizerError

    stops = set(template.stop_ids(tokenizer))
    reply = tokenizer.decode([i for i in ids if i not in stops])
    cut = find_stop(reply, stop_strings)
    reply = (reply if cut is None else reply[:cut]).strip()
    if not reply:
        return None
    try:
        template.render(tokenizer, [{"role": "user", "content": "?"}, {"role": "assistant", "content": reply}])
    except TokenizerError:
        return None
    return reply
