"""Ghost Attention (GAtt, Llama 2 §3.3; spec §11.2): multi-turn SFT data in which one system instruction
holds for the whole dialogue.

For a dialogue and an instruction `inst` (its own system message, or sampled from a list):
  sampling   `inst` is joined to every user turn and the replies are sampled turn by turn from a policy
             (Llama 2: the latest RLHF model), so every reply follows it; or the dialogue's own replies
             are taken, when they were produced that way;
  training   `inst` is kept in the first turn only, and every earlier reply is context (weight 0): the
             loss falls on the last reply alone, since the earlier ones were sampled under an instruction
             the training context no longer repeats.

The records are `messages` SFT records (`jaxllm sft` reads them); a reply of weight 0 gets no loss.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from jaxllm.stages.data import DataFormatError, Stats, read_jsonl, reply_text, to_messages

PLACES = ("user", "system")     # where the training record keeps the instruction: joined to turn 1, or system
TARGETS = ("last", "every")     # one record per dialogue (its last reply), or one per reply


def join(instruction: str, user: str) -> str:
    """A user turn with the instruction in front (how GAtt attaches it for sampling)."""
    return f"{instruction.strip()}\n{user.strip()}"


def read_instructions(path: str | Path) -> list[str]:
    """Instructions, one per line of a text file, or the `instruction` field of a jsonl file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such instructions file")
    out = []
    for number, line in enumerate(path.read_text("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataFormatError(f"{path}:{number}: bad JSON: {err.msg}") from None
            if not isinstance(record, dict) or not isinstance(record.get("instruction"), str):
                raise DataFormatError(f'{path}:{number}: expected {{"instruction": "..."}}')
            line = record["instruction"]
        out.append(line.strip())
    if not out:
        raise DataFormatError(f"{path}: no instructions")
    return out


def choose_instruction(instructions: list[str], rng: np.random.Generator, combine: int = 1) -> str:
    """One instruction, or (Llama 2's way of making them more diverse) 1 to `combine` distinct ones joined."""
    count = int(rng.integers(1, min(combine, len(instructions)) + 1))
    picked = rng.choice(len(instructions), size=count, replace=False)
    return " ".join(instructions[i] for i in sorted(picked))


@dataclasses.dataclass
class Dialogue:
    where: str                 # file:line
    instruction: str | None    # its system message, if it has one
    users: list[str]
    replies: list[str]         # its own replies (as many as users when complete)


def split_dialogue(messages: list[dict], where: str) -> Dialogue:
    """(system instruction, user turns, replies) of a conversation: an optional system message, then user
    and assistant turns alternating, starting with a user turn."""
    instruction = None
    if messages and messages[0]["role"] == "system":
        instruction = messages[0]["content"].strip() or None
        messages = messages[1:]
    for i, m in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise DataFormatError(f"turn {i} is '{m['role']}' but '{expected}' was expected")
        if not m["content"].strip():
            raise DataFormatError(f"turn {i} ({m['role']}) is empty")
    if not messages:
        raise DataFormatError("no user turn")
    return Dialogue(where, instruction, [m["content"] for m in messages[0::2]],
                    [m["content"] for m in messages[1::2]])


def read_dialogues(files, stats: Stats, on_error: str = "skip") -> list[Dialogue]:
    """Dialogues from SFT jsonl files in any supported format; bad records skipped and counted, or raised
    with file:line (`on_error="raise"`)."""
    out = []
    for path in files:
        for where, record in read_jsonl(path, stats, on_error):
            try:
                out.append(split_dialogue(to_messages(record), where))
            except DataFormatError as err:
                if on_error == "raise":
                    raise DataFormatError(f"{where}: {err}") from None
                stats.skip(str(err).split(":")[0][:60])
    return out


def training_records(instruction: str, users: list[str], replies: list[str], *, place: str = "user",
                     targets: str = "last") -> list[dict]:
    """The GAtt training records of one sampled dialogue: the instruction in the first turn only (joined to
    the first user turn, or as the system message), every reply but the record's last at weight 0.
    `targets="every"` makes one record per reply (the dialogue up to it), so each reply trains once."""
    if place not in PLACES:
        raise ValueError(f"place must be one of {PLACES}, got {place!r}")
    if targets not in TARGETS:
        raise ValueError(f"targets must be one of {TARGETS}, got {targets!r}")
    turns = min(len(users), len(replies))
    if turns == 0:
        return []
    ends = range(1, turns + 1) if targets == "every" else [turns]
    records = []
    for end in ends:
        messages = [{"role": "system", "content": instruction}] if place == "system" else []
        for t in range(end):
            user = join(instruction, users[t]) if (t == 0 and place == "user") else users[t]
            messages.append({"role": "user", "content": user})
            reply = {"role": "assistant", "content": replies[t]}
            if t < end - 1:
                reply["weight"] = 0
            messages.append(reply)
        records.append({"messages": messages, "gatt_instruction": instruction})
    return records


def sampling_messages(instruction: str, users: list[str], replies: list[str]) -> list[dict]:
    """The conversation a reply to `users[len(replies)]` is sampled after: the instruction joined to every
    user turn, the earlier replies as they were sampled."""
    messages = []
    for t, user in enumerate(users[:len(replies) + 1]):
        messages.append({"role": "user", "content": join(instruction, user)})
        if t < len(replies):
            messages.append({"role": "assistant", "content": replies[t]})
    return messages


def sample_replies(model_config, params, tokenizer, template, instructions: list[str], dialogues: list[list[str]],
                   sampling, rng, *, max_len: int, batch_size: int = 16, mesh=None, stop_strings=(),
                   stats: Stats | None = None):
    """Replies for each dialogue (its user turns), sampled turn by turn with the dialogue's instruction
    joined to every user turn (`sampling_messages`). A dialogue ends early, keeping the replies before,
    at a prompt longer than `max_len - sampling.max_new_tokens`, a reply that did not finish within
    `max_new_tokens`, or one SFT could not use; each is counted in `stats.reasons`."""
    import jax

    from jaxllm.inference import generate

    stats = stats if stats is not None else Stats()
    replies: list[list[str]] = [[] for _ in dialogues]
    alive = [True] * len(dialogues)
    stop_ids = template.stop_ids(tokenizer)
    budget = max_len - sampling.max_new_tokens
    for turn in range(max((len(d) for d in dialogues), default=0)):
        prompts = []
        for i, users in enumerate(dialogues):
            if not alive[i] or turn >= len(users):
                continue
            ids = template.prompt(tokenizer, sampling_messages(instructions[i], users, replies[i]))
            if len(ids) > budget:
                alive[i] = False
                stats.reasons["ended: prompt too long"] = stats.reasons.get("ended: prompt too long", 0) + 1
                continue
            prompts.append((i, ids))
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            rng, key = jax.random.split(rng)
            out = generate(model_config, params, [ids for _, ids in chunk], sampling, key, stop_ids=stop_ids,
                           mesh=mesh, stop_strings=stop_strings, decode=tokenizer.decode,
                           vocab_limit=tokenizer.vocab_size)
            for (i, _), ids, stopped in zip(chunk, out.tokens, out.stopped):
                text = reply_text(ids, tokenizer, template, stop_strings) if stopped else None
                if text is None:
                    alive[i] = False
                    why = "ended: reply unfinished" if not stopped else "ended: reply unusable"
                    stats.reasons[why] = stats.reasons.get(why, 0) + 1
                else:
                    replies[i].append(text)
    return replies
