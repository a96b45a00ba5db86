"""`jaxllm sft | dpo | rm [RECIPE] [key=value ...]`: the post-pretraining stages, on the one train loop.

A recipe is a pretraining-style YAML plus a `stage:` section (template, truncation, beta, margin, …);
`data.sources` name the jsonl files. Same checkpoints, resume, metrics and progress as `jaxllm train`."""
from __future__ import annotations

import argparse
import json
import sys

DEFAULTS = {"sft": "sft-demo", "dpo": "dpo-demo", "rm": "rm-demo"}
EXAMPLES = {
    "sft": "jaxllm sft                 the demo: chat SFT of the demo model (run `jaxllm train` first)\n"
           "  jaxllm sft llama2-7b-sft --init-from ckpt/llama2-7b data.sources.0.path=my_sft.jsonl",
    "dpo": "jaxllm dpo                 the demo: DPO from the SFT demo model (run `jaxllm sft` first)\n"
           "  jaxllm dpo ctllm-2b-dpo --init-from ckpt/ctllm-sft stage.beta=0.1",
    "rm": "jaxllm rm                  the demo: a reward model from the SFT demo model\n"
          "  jaxllm rm llama2-7b-rm --init-from ckpt/llama2-7b-chat stage.margin=small\n"
          "  jaxllm rm llama2-7b-rm --compile-only --topology v5p-32   does its step fit 16 v5p chips?",
}


def run(kind: str, argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=f"jaxllm {kind}", description=__doc__,
                                     epilog="examples:\n  " + EXAMPLES[kind],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("args", nargs="*", metavar="RECIPE|key=value")
    parser.add_argument("--init-from", metavar="DIR", help="starting checkpoint (jaxllm or a training run)")
    parser.add_argument("--run-dir", metavar="DIR")
    parser.add_argument("--print-config", action="store_true")
    from jaxllm.preflight.cli import add_arguments, topology_from_args
    add_arguments(parser)
    args = parser.parse_intermixed_args(argv)  # flags and key=value in any order
    from jaxllm.train.config import recipe_and_overrides
    recipe, overrides = recipe_and_overrides(args.args, parser.error, init_from=args.init_from,
                                             run_dir=args.run_dir)
    target = topology_from_args(args, parser.error)

    from jaxllm.checkpoint import CheckpointError
    from jaxllm.config import ConfigError
    from jaxllm.data import DataError
    from jaxllm.stages.data import DataFormatError
    from jaxllm.stages.stages import dpo_stage, load_stage_recipe, reward_accuracy, rm_stage, sft_stage
    from jaxllm.storage import StorageError
    from jaxllm.tokenizer import TokenizerError

    try:
        config, options = load_stage_recipe(recipe or DEFAULTS[kind], overrides)
        if args.print_config:
            print(config.to_yaml(), end="")  # its `stage:` section holds the options
            return 0
        if target is not None:  # no data, tokenizer or starting checkpoint is read
            from jaxllm.stages.stages import objective
            from jaxllm.preflight.train import preflight_train
            from jaxllm.preflight.cli import finish
            report = preflight_train(config, lambda c: objective(kind, c, options), target)
            return finish(report, args, f"jaxllm {kind}")
        from jaxllm.train.loop import maybe_initialize_distributed, train
        maybe_initialize_distributed(config.distributed)  # before a stage touches JAX (rm's eval_shape)
        if kind == "sft":
            result = train(config, sft_stage(config, options))
        elif kind == "dpo":
            result = train(config, dpo_stage(config, options))
        else:
            stage, held_out = rm_stage(config, options)
            result = train(config, stage)
            if result.exit_code == 0 and len(held_out["tokens"]):
                accuracy = reward_accuracy(config.model, result.full_params, held_out)
                from jaxllm.distributed import is_primary
                if is_primary():  # every process computed the same accuracy
                    pairs = len(held_out["tokens"])
                    print(f"reward model: held-out accuracy {accuracy:.3f} on {pairs} pairs (chance: 0.5 ± "
                          f"{0.5 / pairs ** 0.5:.2f})")
                    from jaxllm import storage  # run_dir may be gs://… (a Path would make a local "gs:")
                    storage.write_atomic(storage.path(config.run_dir) / "eval.json", json.dumps(
                        {"heldout_accuracy": accuracy, "heldout_pairs": pairs}) + "\n")
    except (ConfigError, DataError, DataFormatError, CheckpointError, TokenizerError, StorageError,
            FileNotFoundError) as err:
        print(f"jaxllm {kind}: error: {err}", file=sys.stderr)
        return 2
    return result.exit_code


def sft_main(argv):
    return run("sft", argv)


def dpo_main(argv):
    return run("dpo", argv)


def rm_main(argv):
    return run("rm", argv)
