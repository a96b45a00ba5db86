"""`jaxllm train [RECIPE] [key=value ...]`: pretrain from a YAML recipe; no arguments trains the demo."""
from __future__ import annotations

import argparse
import sys

DEFAULT_RECIPE = "demo"

_EPILOG = """\
examples:
  jaxllm train                                   the demo: a small model on the shipped zh/en corpus (CPU, minutes)
  jaxllm train llama2-7b-pretrain data.sources.0.path='corpus/*.jsonl.gz' run_dir=runs/l7
  jaxllm train configs/demo.yaml train.steps=50 optimizer.lr=1e-3 mesh.fsdp=-1
  jaxllm train ziya-13b-pretrain --init-from ckpt/llama-13b
  jaxllm train llama2-7b-pretrain --compile-only --topology v5p-128   does the step fit a v5p-128 pod slice?

Rerunning the same command resumes from the run directory's latest good checkpoint.
"""


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="jaxllm train", description=__doc__, epilog=_EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("args", nargs="*", metavar="RECIPE|key=value",
                        help=f"a YAML recipe or a shipped recipe's name (default: {DEFAULT_RECIPE}), then overrides")
    parser.add_argument("--init-from", metavar="DIR", help="start from a jaxllm checkpoint's parameters")
    parser.add_argument("--run-dir", metavar="DIR", help="run directory (same as run_dir=DIR)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    from jaxllm.preflight.cli import add_arguments, topology_from_args
    add_arguments(parser)
    args = parser.parse_intermixed_args(argv)  # options may come between the recipe and its overrides
    from jaxllm.train.config import recipe_and_overrides
    recipe, overrides = recipe_and_overrides(args.args, parser.error, init_from=args.init_from,
                                             run_dir=args.run_dir)
    args.target = topology_from_args(args, parser.error)
    return recipe or DEFAULT_RECIPE, overrides, args


def main(argv: list[str] | None = None) -> int:
    recipe, overrides, args = parse_args(sys.argv[1:] if argv is None else argv)
    from jaxllm.checkpoint import CheckpointError
    from jaxllm.config import ConfigError
    from jaxllm.data import DataError
    from jaxllm.storage import StorageError
    from jaxllm.tokenizer import TokenizerError
    from jaxllm.train.config import load_config

    try:
        config = load_config(recipe, overrides)
        if args.print_config:
            print(config.to_yaml(), end="")
            return 0
        if args.target is not None:
            from jaxllm.preflight.train import preflight_train
            from jaxllm.preflight.cli import finish
            from jaxllm.train.stage import pretraining_objective
            return finish(preflight_train(config, pretraining_objective, args.target), args, "jaxllm train")
        from jaxllm.train.loop import train
        result = train(config)
        if config.train.final_eval and result.stop_reason == "done":
            _final_eval(config, result)
    except (ConfigError, DataError, CheckpointError, TokenizerError, StorageError, FileNotFoundError) as err:
        print(f"jaxllm train: error: {err}", file=sys.stderr)
        return 2
    return result.exit_code


def _final_eval(config, result) -> None:
    """`train.final_eval` (the demo: held-out perplexity and greedy samples), on one host."""
    import jax

    if jax.process_count() > 1:
        print("train.final_eval: skipped (one host only; run `jaxllm eval perplexity` on the checkpoint)")
        return
    from jaxllm.train.final_eval import final_eval
    final_eval(config, result.full_params, result.step, result.run_dir)
