"""Pre-flight of every shipped pretraining and PPO recipe: its step (PPO: one iteration's five programs)
compiled with the TPU compiler for the v5p slice it is meant for, from this CPU host, nothing allocated.

Each recipe's slice (TARGETS) is the smallest v5p slice on which its fp32 training state (parameters, Adam
moments and gradients: 16 bytes per parameter; PPO: two policies, the value and reward models and their
optimizer state) takes at most a tenth of the chip's HBM, leaving the rest to activations; the recipe's
`train.grad_accum` (PPO: its mesh) is what makes the activations of its global batch fit there. A recipe
that does not fit makes this script exit 1: fix the recipe, not the table.

    python bench/preflight.py                              # every recipe (an hour or more on a 2-core CPU)
    python bench/preflight.py --only llama2-7b-pretrain ctllm-2b-pretrain
    python bench/preflight.py --tiny --topology cpu-4      # the tiny preset in each recipe (the test suite)
    python bench/preflight.py --attention einsum fused     # a row per attention path for pretraining recipes
    python bench/preflight.py --only llama2-7b-pretrain --attention einsum fused --set data.seq_len=8192
"""
from __future__ import annotations

import argparse
import sys

from jaxllm.preflight.collectives import KINDS

# recipe -> the slice it is meant for (see the module docstring for the rule)
TARGETS = {
    "llama2-7b-pretrain": "v5p-32",
    "llama2-13b-pretrain": "v5p-64",
    "llama2-70b-pretrain": "v5p-256",
    "baichuan2-13b-pretrain": "v5p-64",
    "ctllm-2b-pretrain": "v5p-8",
    "ziya-13b-pretrain": "v5p-64",
    "llama2-7b-ppo": "v5p-64",
    "llama2-70b-ppo": "v5p-512",
    "baichuan-7b-pretrain": "v5p-32",
    "baichuan-13b-pretrain": "v5p-64",
    "baichuan2-7b-pretrain": "v5p-32",
    "llama2-7b-ppo-lora": "v5e-8",  # the LoRA recipe is sized for the smallest slice it fits, not by the rule
}
# --tiny: each recipe's structure (batch layout, accumulation, stage) on a model and batch a CPU compiles in
# seconds
TINY_TRAIN = ["model.preset=llama2-tiny", "data.seq_len=32", "train.batch_size=8", "train.grad_accum=2"]
TINY_PPO = {"models": {"policy": {"preset": "llama2-tiny"}}, "ppo.batch_size": 8, "ppo.minibatch_size": 4,
            "ppo.max_new_tokens": 8}


ATTENTION = {"einsum": "reference", "fused": "splash"}  # --attention: the path a pretraining recipe compiles


def preflight(recipe: str, topology, tiny: bool, log, overrides=()):
    """The pre-flight Report of one shipped recipe on `topology`."""
    if recipe.endswith(("-ppo", "-ppo-lora")):
        from jaxllm.rlhf.cli import load_recipe
        from jaxllm.preflight.ppo import preflight_ppo, recipe_models

        overrides = [f"{k}={v}" for k, v in TINY_PPO.items() if k != "models"] if tiny else []
        loaded = load_recipe("ppo", recipe, overrides)
        if tiny:
            loaded.models = TINY_PPO["models"]
        policy, reward_models = recipe_models(loaded)
        return preflight_ppo(policy, reward_models, loaded.ppo, loaded.mesh, topology, 8 if tiny else None, log=log,
                             lora=loaded.lora, base=loaded.policy)
    from jaxllm.train.config import load_config
    from jaxllm.preflight.train import preflight_train
    from jaxllm.train.stage import pretraining_objective

    config = load_config(recipe, (TINY_TRAIN if tiny else []) + list(overrides))
    return preflight_train(config, pretraining_objective, topology, log=log)


def row(recipe: str, report, attention: str = "auto") -> str:
    gib = 2**30
    state = report.state
    params = state.get("parameters", sum(v for k, v in state.items() if "optimizer" not in k))
    opt = state.get("optimizer state", 0)
    compiled = [p for p in report.programs if p.collectives]
    counts = [sum(p.calls * p.collectives.by_kind[k].count for p in compiled) for k in KINDS]
    moved = sum(p.calls * p.collectives.total_bytes for p in compiled) / gib
    margin = (report.hbm - report.peak) / gib
    return (f"{recipe:<24}{attention:>8}{report.topology.name:>10}{len(report.devices):>6}{params / gib:>9.2f}{opt / gib:>9.2f}"
            f"{(report.peak - report.state_bytes) / gib:>10.2f}{report.peak / gib:>9.2f}{report.hbm / gib:>8.2f}"
            f"{'yes' if report.fits else 'NO':>6}{margin:>9.2f}{report.tokens:>12,}{report.compile_s:>10.1f}"
            f"{'/'.join(map(str, counts)) if compiled else '-':>26}{moved:>9.1f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", metavar="RECIPE", help="these recipes (default: every one in TARGETS)")
    parser.add_argument("--topology", help="compile every recipe for this topology instead of its own (e.g. cpu-4)")
    parser.add_argument("--tiny", action="store_true", help="the tiny preset in each recipe (seconds per recipe)")
    parser.add_argument("--tables", action="store_true", help="print each recipe's full pre-flight table too")
    parser.add_argument("--attention", nargs="+", choices=sorted(ATTENTION),
                        help="pretraining recipes: compile with these attention paths (a row each) instead of "
                             "model.attention=auto (fused on TPU)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="overrides for every pretraining recipe, e.g. data.seq_len=8192 train.grad_accum=16")
    args = parser.parse_args(argv)
    recipes = args.only or list(TARGETS)
    unknown = [r for r in recipes if r not in TARGETS]
    if unknown:
        raise SystemExit(f"preflight: not a shipped pretraining or PPO recipe: {', '.join(unknown)}; "
                         f"known: {', '.join(TARGETS)}")

    from jaxllm.preflight import topology as topologies
    from jaxllm.config import ConfigError

    topologies.hide_absent_tpu()
    try:
        targets = {r: topologies.parse(args.topology or TARGETS[r]) for r in recipes}
        if args.topology and targets[recipes[0]].platform == "cpu":
            targets[recipes[0]].devices()  # N CPU devices before JAX starts
    except ConfigError as err:
        raise SystemExit(f"preflight: {err}") from None
    import jax

    print(f"jax {jax.__version__}; memory per device from XLA's analysis of each compiled executable; PPO: one "
          f"iteration (prefill, decode, scoring, statistics, update), prompts up to the context minus "
          f"max_new_tokens{'; tiny preset' if args.tiny else ''}\n")
    header = (f"{'recipe':<24}{'attn':>8}{'topology':>10}{'chips':>6}{'params':>9}{'opt':>9}{'temp+io':>10}{'total':>9}"
              f"{'HBM':>8}{'fits':>6}{'margin':>9}{'tokens/step':>12}{'compile s':>10}{'AG/RS/AR/A2A/CP':>26}"
              f"{'coll GiB':>9}")
    rows, failed = [], []
    runs = [(recipe, topology, path) for recipe, topology in targets.items()
            for path in (args.attention if args.attention and not recipe.endswith(("-ppo", "-ppo-lora")) else ["auto"])]
    for recipe, topology, path in runs:
        overrides = [] if path == "auto" else [f"model.attention={ATTENTION[path]}"]
        if not recipe.endswith(("-ppo", "-ppo-lora")):
            overrides += args.set
        try:
            report = preflight(recipe, topology, args.tiny, log=lambda *a: print(*a, file=sys.stderr, flush=True),
                               overrides=overrides)
        except ConfigError as err:
            raise SystemExit(f"preflight: {recipe}: {err}") from None
        if args.tables:
            print(report.table(), flush=True)
        rows.append(row(recipe, report, path))
        for program in report.programs:  # executables of big models hold host memory
            program.compiled = None
        print(rows[-1], file=sys.stderr, flush=True)
        if not report.fits:
            failed.append(f"{recipe} ({path}): {report.verdict()}"
                          + (f"; try {report.suggestion}" if report.suggestion else ""))
    print("GiB per chip; temp+io: temporaries and unaliased inputs/outputs (PPO: of its largest program); "
          "AG/RS/AR/A2A/CP: all-gathers, reduce-scatters, all-reduces, all-to-alls, collective-permutes per step "
          "(PPO: per iteration, every program), loops unrolled; coll GiB: their bytes per chip\n")
    print(header)
    print("\n".join(rows))
    for line in failed:
        print(f"does not fit: {line}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
