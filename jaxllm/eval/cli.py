"""`jaxllm eval perplexity --checkpoint DIR FILES...` | `jaxllm eval choice --checkpoint DIR FILES...`.

perplexity reads text (one document per blank-line-separated block) or jsonl (`--text-field`);
choice reads C-Eval CSVs (with a header row), MMLU CSVs (none: question,A,B,C,D,answer) or jsonl with
question, A-D, answer (and subject) and prints accuracy per subject and overall. With no FILES, the tiny
sample sets shipped in jaxllm/assets/eval are used. Parameters are split over all devices (--mesh), on
several hosts too: run the same command on each (see README, "Scaling out"); process 0 prints the result."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "eval"


def read_texts(path: Path, text_field: str) -> list[str]:
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    if path.suffix in (".jsonl", ".json"):
        texts = []
        for number, line in enumerate(path.read_text("utf-8").splitlines(), 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{number}: bad JSON: {err.msg}") from None
                if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                    raise ValueError(f"{path}:{number}: no string field '{text_field}'")
                texts.append(record[text_field])
        return texts
    return [block.strip() for block in path.read_text("utf-8").split("\n\n") if block.strip()]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="jaxllm eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="task", required=True)
    for name in ("perplexity", "choice"):
        p = sub.add_parser(name)
        p.add_argument("--checkpoint", required=True)
        p.add_argument("files", nargs="*")
        p.add_argument("--tokenizer")
        p.add_argument("--batch-size", type=int, default=8)
        p.add_argument("--json", action="store_true", help="print the result as JSON")
        p.add_argument("--mesh", default="auto", help="'auto' (tensor-parallel over all devices), 'none' (one "
                       "device) or DATA,FSDP,TENSOR sizes")
        if name == "perplexity":
            p.add_argument("--text-field", default="text")
            p.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args(argv)

    from jaxllm.checkpoint import CheckpointError
    from jaxllm.config import ConfigError
    from jaxllm.convert.readers import ConversionError
    from jaxllm.distributed import is_primary
    from jaxllm.eval.scoring import choice_accuracy, perplexity, read_questions
    from jaxllm.inference.loading import load_model, serving_mesh
    from jaxllm.tokenizer import TokenizerError
    from jaxllm.train.loop import maybe_initialize_distributed

    try:
        maybe_initialize_distributed()  # several processes: before the mesh spans their devices
        default = "sample_text.txt" if args.task == "perplexity" else "sample_choice.jsonl"
        files = [Path(f) for f in args.files] or [ASSETS / default]
        if args.task == "perplexity":
            texts = [t for f in files for t in read_texts(f, args.text_field)]
        else:
            questions = [q for f in files for q in read_questions(f)]
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        mesh = serving_mesh(args.mesh)
        config, params, tok = load_model(args.checkpoint, tokenizer=args.tokenizer, mesh=mesh)
        if tok is None:
            raise ValueError(f"{args.checkpoint}: no tokenizer.model stored with it; pass --tokenizer")
        if args.task == "perplexity":
            result = perplexity(config, params, tok, texts, args.seq_len, args.batch_size, mesh)
        else:
            result = choice_accuracy(config, params, tok, questions, args.batch_size, mesh)
    except (ValueError, ConfigError, CheckpointError, ConversionError, TokenizerError) as err:
        print(f"jaxllm eval: error: {err}", file=sys.stderr)
        return 2
    if not is_primary():  # every process holds the same result
        return 0
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    elif args.task == "perplexity":
        print(f"perplexity {result['perplexity']:.3f} (nll {result['nll']:.4f} over {result['tokens']} tokens)")
    else:
        for subject, r in result["subjects"].items():
            print(f"{subject:<24} {r['accuracy']:6.1%}  ({r['questions']} questions)")
        print(f"{'overall':<24} {result['accuracy']:6.1%}  ({result['questions']} questions)")
    return 0
