"""Ghost Attention on a tiny model, on a CPU: does an instruction given in the first turn still hold at
turns 3 and 4, with and without GAtt?

The world is synthetic and every reply is checkable. A user turn is "Say WORD."; the default reply is
"WORD."; an instruction changes it measurably ("Answer in capital letters." → "WORD.", "Start every
answer with Yes." → "Yes, word.", …).

1. base      SFT from scratch on multi-turn dialogues in which an instruction, when there is one, sits in
             the user turn it applies to (users give instructions per turn): the model follows an
             instruction in the current turn, and nothing teaches it to keep one across turns.
2. gatt      GAtt data from the base model, as Llama 2 builds it: each training dialogue gets an
             instruction from the list, joined to every user turn for sampling (`jaxllm.stages.gatt`),
             the replies sampled greedily turn by turn; dialogues whose replies do not all follow it are
             dropped (the checker stands in for Llama 2's reward model); the records keep the instruction
             in the first turn only, earlier replies at weight 0. Then SFT from base on GAtt records mixed
             1:1 (by examples) with the base data.
   control   SFT from base for the same steps on the base data alone (so more steps alone explain nothing).
3. eval      held-out dialogues with the instruction in the first user turn only; each model answers turn
             by turn (greedy, its own replies in the history); a reply follows when it equals the
             instruction's reply exactly. Dialogues without an instruction check the default is intact.

    python examples/gatt_demo.py        # 15 minutes on the project's 2-core CPU under load (500 SFT steps)
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "jaxllm" / "assets" / "demo" / "tokenizer.model"
WORDS = ("river stone cloud apple bread water light night house field horse sheep tree bird fire wind rain "
         "snow gold silver king queen child mother father garden city road door table window ship boat "
         "mountain valley star moon sun flower grass wheat").split()
# instruction → how it changes the reply to "Say WORD."
RULES = {
    "Answer in capital letters.": lambda w: f"{w.upper()}.",
    "Start every answer with Yes.": lambda w: f"Yes, {w}.",
    "Repeat the word twice.": lambda w: f"{w} {w}.",
    "End every answer with Amen.": lambda w: f"{w}. Amen.",
}
INSTRUCTIONS = list(RULES)


def default_reply(word: str) -> str:
    return f"{word}."


def user_turn(word: str) -> str:
    return f"Say {word}."


def base_dialogues(n: int, rng) -> list[dict]:
    """Multi-turn SFT records: half without instructions, half with one instruction in some user turns
    (the reply of such a turn follows it, the others are default)."""
    from jaxllm.stages.gatt import join

    records = []
    for i in range(n):
        turns = int(rng.integers(1, 5))
        words = rng.choice(WORDS, size=turns)
        instruction = INSTRUCTIONS[int(rng.integers(len(INSTRUCTIONS)))] if i % 2 else None
        messages = []
        for word in words:
            here = instruction is not None and rng.random() < 0.5
            messages.append({"role": "user", "content": join(instruction, user_turn(word)) if here else user_turn(word)})
            messages.append({"role": "assistant", "content": RULES[instruction](word) if here else default_reply(word)})
        records.append({"messages": messages})
    return records


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def sft(run_dir, sources, steps, init_from, model, seed, seq_len, lr, log=print):
    """One `jaxllm sft` run (in-process): its final parameters as numpy."""
    import jax

    from jaxllm.stages.stages import StageOptions, sft_stage
    from jaxllm.train.config import load_config
    from jaxllm.train.loop import train

    config = load_config(None, [], base={
        "run_dir": str(run_dir), "seed": seed, "init_from": init_from and str(init_from), "model": model,
        "data": {"sources": sources, "tokenizer": str(TOKENIZER), "seq_len": seq_len},
        "optimizer": {"lr": lr, "schedule": "cosine", "warmup_steps": 10, "min_lr_ratio": 0.1, "weight_decay": 0.0},
        "train": {"steps": steps, "batch_size": 16}, "checkpoint": {"every": steps, "keep": 1},
        "log": {"every": max(1, steps // 5), "progress": False, "tensorboard": False, "plot": False}})
    options = StageOptions(template="llama2-chat", mix_by="examples")
    options.validate()
    result = train(config, sft_stage(config, options, log=log), log=log)
    return config.model, jax.tree.map(np.asarray, result.params)


def answer_turns(model_config, params, tok, template, instructions, dialogues, max_new_tokens=12):
    """Greedy replies per dialogue, turn by turn, with the instruction (if any) joined to the first user
    turn only and the model's own replies as history."""
    import jax

    from jaxllm.inference import SamplingParams, generate
    from jaxllm.stages.gatt import join

    sampling = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)
    replies = [[] for _ in dialogues]
    for turn in range(max(len(d) for d in dialogues)):
        todo = [i for i, d in enumerate(dialogues) if turn < len(d)]
        prompts = []
        for i in todo:
            messages = []
            for t, word in enumerate(dialogues[i][:turn + 1]):
                text = user_turn(word)
                if t == 0 and instructions[i]:
                    text = join(instructions[i], text)
                messages.append({"role": "user", "content": text})
                if t < turn:
                    messages.append({"role": "assistant", "content": replies[i][t] or "…"})
            prompts.append(template.prompt(tok, messages))
        out = generate(model_config, params, prompts, sampling, jax.random.key(0),
                       stop_ids=template.stop_ids(tok), vocab_limit=tok.vocab_size)
        for i, ids in zip(todo, out.tokens):
            stops = set(template.stop_ids(tok))
            replies[i].append(tok.decode([x for x in ids if x not in stops]).strip())
    return replies


def follow_rates(replies, dialogues, instructions, turns: int) -> list[float]:
    """Per turn, the fraction of replies equal to what the instruction (or the default) asks."""
    rates = []
    for t in range(turns):
        hits = [replies[i][t] == (RULES[instructions[i]] if instructions[i] else default_reply)(d[t])
                for i, d in enumerate(dialogues) if t < len(d)]
        rates.append(float(np.mean(hits)) if hits else float("nan"))
    return rates


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-steps", type=int, default=300)
    parser.add_argument("--tune-steps", type=int, default=100)
    parser.add_argument("--base-dialogues", type=int, default=1500)
    parser.add_argument("--gatt-dialogues", type=int, default=200)
    parser.add_argument("--eval", type=int, default=48, help="held-out dialogues of 4 turns per arm")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", help="keep the runs and data here (default: a temporary directory)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)

    from jaxllm.stages import gatt
    from jaxllm.tokenizer import Tokenizer, get_chat_template

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="gatt-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    tok, template = Tokenizer.load(TOKENIZER), get_chat_template("llama2-chat")
    model = {"preset": "demo", "hidden_size": args.hidden, "intermediate_size": 3 * args.hidden,
             "num_layers": args.layers, "num_heads": 4, "num_kv_heads": 2, "dtype": "float32",
             "attention": "reference"}
    quiet = lambda *_: None  # noqa: E731
    began = time.perf_counter()

    base_data = write_jsonl(work / "base.jsonl", base_dialogues(args.base_dialogues, rng))
    base_source = {"name": "base", "path": str(base_data)}
    cfg, base = sft(work / "base", [base_source], args.base_steps, None, model, args.seed, 192, 3e-3, log=quiet)
    print(f"base: {args.base_steps} SFT steps from scratch ({time.perf_counter() - began:.0f} s)")

    # GAtt data sampled from the base model with the instruction on every user turn
    import jax
    from jaxllm.inference import SamplingParams

    users = [[user_turn(w) for w in rng.choice(WORDS, size=int(rng.integers(2, 5)))]
             for _ in range(args.gatt_dialogues)]
    chosen = [gatt.choose_instruction(INSTRUCTIONS, rng) for _ in users]
    sampled = gatt.sample_replies(cfg, base, tok, template, chosen, users,
                                  SamplingParams(temperature=0.0, max_new_tokens=12), jax.random.key(1),
                                  max_len=192, batch_size=64)
    records, kept = [], 0
    for inst, turns, replies in zip(chosen, users, sampled):
        words = [u[len("Say "):-1] for u in turns]
        if len(replies) == len(turns) and all(r == RULES[inst](w) for r, w in zip(replies, words)):
            kept += 1
            records += gatt.training_records(inst, turns, replies, targets="every")
    write_jsonl(work / "gatt.jsonl", records)
    print(f"gatt data: {kept} of {len(users)} sampled dialogues follow their instruction at every turn "
          f"→ {len(records)} records ({time.perf_counter() - began:.0f} s)")
    if not records:
        print("the base model follows no instruction yet: train it longer (--base-steps)", file=sys.stderr)
        return 1

    cfg, tuned = sft(work / "gatt", [{"name": "gatt", "path": str(work / "gatt.jsonl")}, base_source],
                     args.tune_steps, work / "base", model, args.seed, 192, 1e-3, log=quiet)
    _, control = sft(work / "control", [base_source], args.tune_steps, work / "base", model, args.seed, 192, 1e-3,
                     log=quiet)
    print(f"gatt and control: {args.tune_steps} SFT steps each from base ({time.perf_counter() - began:.0f} s)")

    held = [list(rng.choice(WORDS, size=4)) for _ in range(args.eval)]
    instructions = [INSTRUCTIONS[i % len(INSTRUCTIONS)] for i in range(args.eval)]
    plain = [None] * args.eval
    table = {}
    for name, params in (("without GAtt (base)", base), ("without GAtt (control)", control), ("with GAtt", tuned)):
        replies = answer_turns(cfg, params, tok, template, instructions, held)
        rates = follow_rates(replies, held, instructions, 4)
        defaults = follow_rates(answer_turns(cfg, params, tok, template, plain, held), held, plain, 4)
        table[name] = {"turns": rates, "turn>=3": float(np.mean(rates[2:])), "no instruction": float(np.mean(defaults))}
    print(f"\ninstruction following, {args.eval} held-out 4-turn dialogues, instruction in turn 1 only "
          f"({time.perf_counter() - began:.0f} s in all)")
    print(f"{'model':<24}{'turn 1':>8}{'turn 2':>8}{'turn 3':>8}{'turn 4':>8}{'turns>=3':>10}{'no-inst default':>17}")
    for name, row in table.items():
        print(f"{name:<24}" + "".join(f"{r:>8.2f}" for r in row["turns"]) + f"{row['turn>=3']:>10.2f}"
              + f"{row['no instruction']:>17.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"gatt_records": len(records), "kept_dialogues": kept, **table}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
