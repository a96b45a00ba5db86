"""`jaxllm data gatt | curriculum`: build the data sets of the seed models' alignment recipes.

  gatt        Ghost Attention (Llama 2): multi-turn SFT data in which a system instruction holds for every
              turn, while the training context shows it in the first turn only
  curriculum  Ziya's easy-to-hard SFT: split SFT data into stages by a model's loss on the replies

Output files are written whole or not at all, and never over an existing file without --overwrite."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jaxllm.storage import write_lines_atomic

GATT_EXAMPLES = """examples:
  # Llama 2: replies sampled from the policy with the instruction on every user turn
  jaxllm data gatt dialogues.jsonl --instructions instructions.txt --policy runs/rlhf-v3 -o gatt.jsonl
  # replies already produced under each dialogue's system message
  jaxllm data gatt sampled.jsonl -o gatt.jsonl --targets every
  jaxllm sft llama2-7b-sft --init-from runs/rlhf-v3 data.sources.0.path=gatt.jsonl"""

CURRICULUM_EXAMPLES = """examples:
  jaxllm data curriculum data/sft/*.jsonl --checkpoint ckpt/ziya-13b --stages 3 -o data/ziya-curriculum
  jaxllm sft ziya-13b-sft data.sources.0.path=data/ziya-curriculum/stage1.jsonl run_dir=runs/ziya-sft-1
  jaxllm sft ziya-13b-sft data.sources.0.path=data/ziya-curriculum/stage2.jsonl run_dir=runs/ziya-sft-2 \\
      init_from=runs/ziya-sft-1"""


def _parser() -> argparse.ArgumentParser:
    from jaxllm.inference.generate_cli import add_sampling_args
    from jaxllm.stages.gatt import PLACES, TARGETS

    parser = argparse.ArgumentParser(prog="jaxllm data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)

    gatt = sub.add_parser("gatt", help="Ghost Attention multi-turn SFT data (Llama 2)", epilog=GATT_EXAMPLES,
                          formatter_class=argparse.RawDescriptionHelpFormatter,
                          description="Each dialogue (SFT jsonl, any format) gets an instruction: its own system "
                                      "message, or one sampled from --instructions. With --policy its replies are "
                                      "sampled turn by turn with the instruction joined to every user turn; "
                                      "without, its own replies are kept. The records keep the instruction in "
                                      "the first turn only and train on the last reply only.")
    gatt.add_argument("files", nargs="+", help="dialogues: jsonl in the SFT formats (messages, conversations, ...)")
    gatt.add_argument("--output", "-o", required=True, help="jsonl of `messages` SFT records to write")
    gatt.add_argument("--instructions", help="instructions, one per line (or jsonl with an 'instruction' field), "
                                             "for dialogues without a system message")
    gatt.add_argument("--combine", type=int, default=1, help="join 1 to N distinct instructions (Llama 2 "
                                                             "combines constraints); default 1")
    gatt.add_argument("--policy", help="checkpoint, run or HF directory to sample the replies from")
    gatt.add_argument("--place", choices=PLACES, default="user",
                      help="training records keep the instruction joined to the first user turn (Llama 2) or as "
                           "the system message")
    gatt.add_argument("--targets", choices=TARGETS, default="last",
                      help="one record per dialogue trained on its last reply, or one per reply")
    gatt.add_argument("--max-turns", type=int, help="use at most N user turns of each dialogue")
    gatt.add_argument("--max-len", type=int, help="token budget of a sampled conversation (default: the "
                                                  "policy's context)")
    gatt.add_argument("--template", help="chat template (default: the policy's family)")
    gatt.add_argument("--batch-size", type=int, default=16, help="dialogues sampled together")
    gatt.add_argument("--on-error", choices=("skip", "raise"), default="skip", help="bad dialogue records")
    gatt.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    add_sampling_args(gatt)

    cur = sub.add_parser("curriculum", help="split SFT data into easy-to-hard stages by a model's loss (Ziya)",
                         epilog=CURRICULUM_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
                         description="Scores every conversation by the model's mean loss per reply token and "
                                     "writes OUT/stage1.jsonl (easiest) … OUT/stageN.jsonl (hardest), the "
                                     "records unchanged, and OUT/scores.jsonl.")
    cur.add_argument("files", nargs="+", help="SFT jsonl files")
    cur.add_argument("--checkpoint", required=True, help="the model that judges difficulty")
    cur.add_argument("--output", "-o", required=True, help="directory for stage1.jsonl … stageN.jsonl")
    cur.add_argument("--stages", type=int, default=3)
    cur.add_argument("--template", help="chat template (default: the model's family)")
    cur.add_argument("--seq-len", type=int, help="longest scored conversation in tokens, the rest scored on their "
                                                 "start (default: the model's context)")
    cur.add_argument("--batch-size", type=int, default=16)
    cur.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype")
    cur.add_argument("--tokenizer", help="tokenizer.model (default: the one stored with the checkpoint)")
    cur.add_argument("--mesh", default="auto", help="'auto' (tensor-parallel over all devices), 'none' or "
                                                    "DATA,FSDP,TENSOR sizes")
    cur.add_argument("--on-error", choices=("skip", "raise"), default="skip", help="bad records")
    cur.add_argument("--overwrite", action="store_true", help="replace existing stage files")
    return parser


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from jaxllm.checkpoint import CheckpointError
    from jaxllm.config import ConfigError
    from jaxllm.data import DataError
    from jaxllm.stages.data import DataFormatError
    from jaxllm.tokenizer import TokenizerError

    try:
        return gatt_main(args) if args.action == "gatt" else curriculum_main(args)
    except (ValueError, ConfigError, DataError, DataFormatError, CheckpointError, TokenizerError,
            FileNotFoundError) as err:
        print(f"jaxllm data {args.action}: error: {err}", file=sys.stderr)
        return 2


def _positive(value, flag: str) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{flag} must be >= 1, got {value}")


def _claim(paths: list[Path], overwrite: bool) -> None:
    for path in paths:
        if path.exists() and not overwrite:
            raise ValueError(f"{path} exists: pass --overwrite to replace it")


def write_jsonl(path: Path, records) -> int:
    """Write records to `path` through a temporary file, so it is whole or absent; the count written."""
    return write_lines_atomic(path, (json.dumps(record, ensure_ascii=False) for record in records))


def _model(path, *, dtype=None, tokenizer=None, mesh_spec="auto", template=None):
    """(config, params, tokenizer, template, mesh) of a model to sample or score with."""
    from jaxllm.inference.loading import load_model, serving_mesh
    from jaxllm.tokenizer import get_chat_template, template_for_family

    mesh = serving_mesh(mesh_spec)
    config, params, tok = load_model(path, dtype=dtype, tokenizer=tokenizer, mesh=mesh)
    if tok is None:
        raise ValueError(f"{path}: no tokenizer.model stored with it; pass --tokenizer")
    return config, params, tok, get_chat_template(template or template_for_family(config.family)), mesh


def gatt_main(args) -> int:
    import jax
    import numpy as np

    from jaxllm.data import expand_paths
    from jaxllm.inference.generate_cli import sampling_from_args
    from jaxllm.inference.stops import check_stop_strings
    from jaxllm.stages import gatt
    from jaxllm.stages.data import Stats

    for value, flag in ((args.combine, "--combine"), (args.max_turns, "--max-turns"), (args.max_len, "--max-len"),
                        (args.batch_size, "--batch-size")):
        _positive(value, flag)
    output = Path(args.output)
    _claim([output], args.overwrite)
    files = [f for pattern in args.files for f in expand_paths(pattern, "dialogues")]
    stats = Stats()
    dialogues = gatt.read_dialogues(files, stats, args.on_error)
    if args.max_turns:
        for d in dialogues:
            d.users, d.replies = d.users[:args.max_turns], d.replies[:args.max_turns]
    if args.instructions and not args.policy:
        raise ValueError("--instructions needs --policy: replies that follow a newly chosen instruction must be "
                         "sampled (without --policy each dialogue's system message is its instruction)")
    instructions = gatt.read_instructions(args.instructions) if args.instructions else None
    lacking = [d.where for d in dialogues if d.instruction is None]
    if lacking and instructions is None:
        hint = ("pass --instructions FILE" if args.policy else
                "without --policy, a dialogue's replies must come with the instruction they follow, as its system "
                "message")
        raise ValueError(f"{lacking[0]}: the dialogue has no system message to use as its instruction; {hint} "
                         f"({len(lacking)} dialogue(s) lack one)")
    rng = np.random.default_rng(args.seed)
    chosen = [d.instruction or gatt.choose_instruction(instructions, rng, args.combine) for d in dialogues]

    if args.policy:
        config, params, tok, template, mesh = _model(args.policy, dtype=args.dtype, tokenizer=args.tokenizer,
                                                     mesh_spec=args.mesh, template=args.template)
        sampling = sampling_from_args(args, config.family)
        max_len = args.max_len or config.max_position_embeddings
        replies = gatt.sample_replies(config, params, tok, template, chosen, [d.users for d in dialogues], sampling,
                                      jax.random.key(args.seed), max_len=max_len, batch_size=args.batch_size,
                                      mesh=mesh, stop_strings=check_stop_strings(args.stop), stats=stats)
    else:
        incomplete = [d.where for d in dialogues if len(d.replies) < len(d.users)]
        if incomplete:
            raise ValueError(f"{incomplete[0]}: the dialogue ends with a user turn; without --policy every user "
                             f"turn needs its reply ({len(incomplete)} dialogue(s))")
        replies = [d.replies for d in dialogues]

    records = [r for instruction, d, sampled in zip(chosen, dialogues, replies)
               for r in gatt.training_records(instruction, d.users, sampled, place=args.place, targets=args.targets)]
    if not records:
        why = ", ".join(f"{k}: {v}" for k, v in sorted(stats.reasons.items())) or "none"
        raise ValueError(f"no GAtt records from {len(dialogues)} dialogues ({stats.skipped} records skipped; "
                         f"reasons: {why})")
    written = write_jsonl(output, records)
    turns = [len(r) for r in replies if r]
    print(f"gatt: {len(dialogues)} dialogues ({stats.skipped} records skipped), {len(set(chosen))} distinct "
          f"instructions, {np.mean(turns):.2f} turns per dialogue; {written} records (targets={args.targets}, "
          f"place={args.place}) written to {output}")
    ended = {k: v for k, v in stats.reasons.items() if k.startswith("ended")}
    if ended:
        print("  dialogues cut short: " + ", ".join(f"{k[len('ended: '):]} {v}" for k, v in sorted(ended.items())))
    return 0


def curriculum_main(args) -> int:
    import jax
    import numpy as np

    from jaxllm.data import expand_paths
    from jaxllm.stages.curriculum import difficulty, split_stages
    from jaxllm.stages.data import Stats, sft_records

    for value, flag in ((args.stages, "--stages"), (args.seq_len, "--seq-len"), (args.batch_size, "--batch-size")):
        _positive(value, flag)
    out_dir = Path(args.output)
    targets = [out_dir / f"stage{k}.jsonl" for k in range(1, args.stages + 1)] + [out_dir / "scores.jsonl"]
    _claim(targets, args.overwrite)
    files = [f for pattern in args.files for f in expand_paths(pattern, "SFT data")]
    config, params, tok, template, mesh = _model(args.checkpoint, dtype=args.dtype, tokenizer=args.tokenizer,
                                                 mesh_spec=args.mesh, template=args.template)
    if mesh is None:
        from jaxllm.sharding import make_mesh
        mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    seq_len = args.seq_len or config.max_position_embeddings
    stats = Stats()
    found = list(sft_records(files, tok, template, seq_len, on_error=args.on_error, stats=stats))
    if len(found) < args.stages:
        raise ValueError(f"{len(found)} usable conversations cannot fill {args.stages} stages ({stats.summary()})")
    scores = difficulty(config, params, [example for *_, example in found], seq_len, mesh,
                        pad_id=max(tok.pad_id, 0), batch=args.batch_size)
    parts = split_stages(scores, args.stages)
    stage_of = np.zeros(len(found), np.int32)
    for k, part in enumerate(parts, 1):
        stage_of[part] = k
    for k, part in enumerate(parts, 1):
        write_jsonl(out_dir / f"stage{k}.jsonl", (found[i][1] for i in part))
    write_jsonl(out_dir / "scores.jsonl", ({"where": where, "loss": round(float(s), 6), "stage": int(k)}
                                           for (where, _, _), s, k in zip(found, scores, stage_of)))
    print(f"curriculum: {len(found)} conversations ({stats.summary()}) scored by {args.checkpoint}")
    print(f"{'stage':<8}{'examples':>10}{'loss min':>10}{'mean':>8}{'max':>8}  file")
    for k, part in enumerate(parts, 1):
        s = scores[part]
        print(f"{k:<8}{len(part):>10}{s.min():>10.3f}{s.mean():>8.3f}{s.max():>8.3f}  {out_dir / f'stage{k}.jsonl'}")
    return 0
