"""`jaxllm eval perplexity | choice | harness --checkpoint DIR ...`.

perplexity reads text (one document per blank-line-separated block) or jsonl (`--text-field`).
choice, given a benchmark's released directory (C-Eval, MMLU, CMMLU, AGIEval, GAOKAO-Bench; detected from its
layout or named by --benchmark), runs it by its own protocol: --shots exemplars from its dev split, its
prompt, the letter with the highest log-likelihood, and its per-subject, per-category and overall averages
(docs/evaluation.md). Given question files instead (C-Eval CSVs with a header, MMLU CSVs without, or jsonl
with question, A-D, answer and subject), it scores them zero-shot. With no FILES, the tiny sample sets
shipped in jaxllm/assets/eval are used.
harness runs EleutherAI lm-evaluation-harness tasks on the model (pip install 'jaxllm[eval]').
Parameters are split over all devices (--mesh), on several hosts too: run the same command on each (see
README, "Scaling out"); process 0 prints the result."""
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
    for name in ("perplexity", "choice", "harness"):
        p = sub.add_parser(name)
        p.add_argument("--checkpoint", required=True)
        if name != "harness":
            p.add_argument("files", nargs="*")
        p.add_argument("--tokenizer")
        p.add_argument("--batch-size", type=int, default=8)
        p.add_argument("--json", action="store_true", help="print the result as JSON")
        p.add_argument("--mesh", default="auto", help="'auto' (tensor-parallel over all devices), 'none' (one "
                       "device) or DATA,FSDP,TENSOR sizes")
        if name == "perplexity":
            p.add_argument("--text-field", default="text")
            p.add_argument("--seq-len", type=int, default=512)
        if name == "choice":
            p.add_argument("--benchmark", choices=["ceval", "mmlu", "cmmlu", "agieval", "gaokao"],
                           help="the benchmark FILES (one directory) is; default: detected from its layout")
            p.add_argument("--shots", type=int, default=0, help="exemplars from the dev split before each question")
            p.add_argument("--split", help="the split to score (default: C-Eval val, the others test)")
            p.add_argument("--subjects", help="comma-separated subjects (default: all)")
            p.add_argument("--limit", type=int, help="score only each subject's first N questions")
        if name == "harness":
            p.add_argument("--tasks", required=True, help="comma-separated lm-eval task (or group) names")
            p.add_argument("--num-fewshot", type=int)
            p.add_argument("--include-path", help="a directory of extra task YAMLs")
            p.add_argument("--limit", type=int, help="only the first N documents of each task")
            p.add_argument("--log-samples", action="store_true", help="write each request's responses to --output")
        if name != "perplexity":
            p.add_argument("--output", help="write the result as JSON to this file")
    args = parser.parse_args(argv)

    from jaxllm.checkpoint import CheckpointError
    from jaxllm.config import ConfigError
    from jaxllm.convert.readers import ConversionError
    from jaxllm.distributed import is_primary
    from jaxllm.tokenizer import TokenizerError

    if args.task == "harness":
        try:
            from jaxllm.eval import harness
        except ModuleNotFoundError as err:
            if (err.name or "").split(".")[0] != "lm_eval":
                raise
            print("jaxllm eval harness: error: lm-evaluation-harness is not installed; pip install 'jaxllm[eval]'",
                  file=sys.stderr)
            return 2
    from jaxllm.eval import fewshot
    from jaxllm.eval.benchmarks import locate
    from jaxllm.eval.scoring import choice_accuracy, perplexity, read_questions
    from jaxllm.inference.loading import load_model, serving_mesh
    from jaxllm.train.loop import maybe_initialize_distributed

    try:
        maybe_initialize_distributed()  # several processes: before the mesh spans their devices
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        benchmark = None
        if args.task == "harness":
            tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
            harness.task_manager(tasks, args.include_path)  # before loading the model
        elif args.task == "perplexity":
            files = [Path(f) for f in args.files] or [ASSETS / "sample_text.txt"]
            texts = [t for f in files for t in read_texts(f, args.text_field)]
        elif args.benchmark or (len(args.files) == 1 and Path(args.files[0]).is_dir()):
            if len(args.files) != 1:
                raise ValueError("--benchmark takes one directory: the benchmark's data as released")
            benchmark, root = locate(args.files[0], args.benchmark)
            subjects = [s.strip() for s in args.subjects.split(",")] if args.subjects else None
            prepared = fewshot.prepare(benchmark, root, split=args.split, shots=args.shots, subjects=subjects,
                                       limit=args.limit)  # bad files or --shots fail before the model loads
        else:
            if args.shots:
                raise ValueError("--shots needs a benchmark directory (its dev split holds the exemplars)")
            files = [Path(f) for f in args.files] or [ASSETS / "sample_choice.jsonl"]
            questions = [q for f in files for q in read_questions(f)]
        mesh = serving_mesh(args.mesh)
        config, params, tok = load_model(args.checkpoint, tokenizer=args.tokenizer, mesh=mesh)
        if tok is None:
            raise ValueError(f"{args.checkpoint}: no tokenizer.model stored with it; pass --tokenizer")
        if args.task == "harness":
            lm = harness.JaxllmLM(config, params, tok, mesh=mesh, batch_size=args.batch_size)
            result = harness.run(lm, tasks, num_fewshot=args.num_fewshot, include_path=args.include_path,
                                 limit=args.limit, log_samples=args.log_samples)
        elif args.task == "perplexity":
            result = perplexity(config, params, tok, texts, args.seq_len, args.batch_size, mesh)
        elif benchmark is not None:
            result = fewshot.evaluate(config, params, tok, benchmark, root, batch_size=args.batch_size, mesh=mesh,
                                      prepared=prepared)
        else:
            result = choice_accuracy(config, params, tok, questions, args.batch_size, mesh)
    except (ValueError, ConfigError, CheckpointError, ConversionError, TokenizerError) as err:
        print(f"jaxllm eval: error: {err}", file=sys.stderr)
        return 2
    if not is_primary():  # every process holds the same result
        return 0
    if getattr(args, "output", None):
        Path(args.output).write_text(json.dumps(result, ensure_ascii=False, indent=1), encoding="utf-8")
    if benchmark is not None:
        result = {k: v for k, v in result.items() if k != "items"}  # per-item scores go to --output only
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    elif args.task == "perplexity":
        print(f"perplexity {result['perplexity']:.3f} (nll {result['nll']:.4f} over {result['tokens']} tokens)")
    elif args.task == "harness":
        for task, metrics in result["results"].items():
            shown = ", ".join(f"{k.split(',')[0]} {v:.4f}" for k, v in metrics.items()
                              if isinstance(v, float) and "stderr" not in k)
            print(f"{task:<32} {shown}")
    elif benchmark is not None:
        print(fewshot.report(result))
    else:
        for subject, r in result["subjects"].items():
            print(f"{subject:<24} {r['accuracy']:6.1%}  ({r['questions']} questions)")
        print(f"{'overall':<24} {result['accuracy']:6.1%}  ({result['questions']} questions)")
    return 0
