"""`jaxllm rejection-sample` and `jaxllm ppo`: RLHF with a reward model trained by `jaxllm rm`.

    jaxllm rejection-sample --policy runs/sft-demo --reward-model runs/rm-demo --k 4 -o best.jsonl
    jaxllm ppo --policy runs/sft-demo --reward-model runs/rm-demo --run-dir runs/ppo-demo ppo.iterations=20

Prompts default to the shipped sample (jaxllm/assets/stages/prompts.jsonl). The rejection-sampling output is
an SFT dataset (`messages` format) that `jaxllm sft` consumes. PPO writes RUN/ppo_metrics.jsonl, resumable
checkpoints in RUN/checkpoints (load the policy with `jaxllm generate --checkpoint RUN`), and RUN/ppo.png."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

PROMPTS = Path(__file__).resolve().parent.parent / "assets" / "stages" / "prompts.jsonl"


def _common(parser):
    parser.add_argument("--policy", required=True, help="starting policy: jaxllm checkpoint or run dir")
    parser.add_argument("--reward-model", required=True, help="run dir of `jaxllm rm`")
    parser.add_argument("--prompts", default=str(PROMPTS), help="jsonl with 'prompt' or text, one per line")
    parser.add_argument("--tokenizer", help="default: the policy's tokenizer.model")


def _load(args):
    from jaxllm.inference.generate_cli import read_prompts
    from jaxllm.inference.loading import load_model
    from jaxllm.stages import reward
    from jaxllm.tokenizer import get_chat_template, template_for_family

    config, params, tok = load_model(args.policy, tokenizer=args.tokenizer)
    if tok is None:
        raise ValueError(f"{args.policy}: no tokenizer.model stored with it; pass --tokenizer")
    rm_config, rm_params = reward.load(args.reward_model)
    if rm_config.vocab_size != config.vocab_size:
        raise ValueError(f"reward model vocabulary ({rm_config.vocab_size}) differs from the policy's "
                         f"({config.vocab_size})")
    texts = read_prompts(args.prompts)
    template = get_chat_template(template_for_family(config.family))
    prompts = [template.prompt(tok, [{"role": "user", "content": t}]) for t in texts]
    return config, params, tok, rm_config, rm_params, texts, prompts, template


def rejection_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="jaxllm rejection-sample", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(parser)
    parser.add_argument("--k", type=int, default=4, help="samples per prompt")
    parser.add_argument("--output", "-o", required=True, help="SFT jsonl to write")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import jax

    from jaxllm.checkpoint import CheckpointError
    from jaxllm.inference import SamplingParams
    from jaxllm.rlhf.ppo import reward_model_scorer
    from jaxllm.rlhf.rejection import best_of_k, reward_vs_k
    from jaxllm.tokenizer import TokenizerError

    try:
        if args.k < 1:
            raise ValueError("--k must be >= 1")
        config, params, tok, rm_config, rm_params, texts, prompts, template = _load(args)
    except (ValueError, CheckpointError, TokenizerError) as err:
        print(f"jaxllm rejection-sample: error: {err}", file=sys.stderr)
        return 2
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens)
    stops = template.stop_ids(tok)
    results = best_of_k(config, params, prompts, reward_model_scorer(rm_config, rm_params), args.k, sampling,
                        jax.random.key(args.seed), stop_ids=stops, pad_id=tok.pad_id)
    with open(args.output, "w", encoding="utf-8") as f:
        for text, (ids, score, _) in zip(texts, results):
            reply = tok.decode([i for i in ids if i not in stops]).strip() or tok.decode(ids)
            f.write(json.dumps({"messages": [{"role": "user", "content": text},
                                             {"role": "assistant", "content": reply or " "}],
                                "reward": score}, ensure_ascii=False) + "\n")
    print(f"{'k':>3} {'mean max reward':>16} {'mean median reward':>19}")
    for row in reward_vs_k([scores for _, _, scores in results]):
        print(f"{row['k']:>3} {row['max']:>16.4f} {row['median']:>19.4f}")
    print(f"wrote {len(results)} best-of-{args.k} examples to {args.output}")
    return 0


def ppo_main(argv: list[str]) -> int:
    from jaxllm.rlhf.ppo import PPOConfig

    parser = argparse.ArgumentParser(prog="jaxllm ppo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(parser)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("overrides", nargs="*", metavar="ppo.KEY=VALUE",
                        help="PPO settings: " + ", ".join(f.name for f in dataclasses.fields(PPOConfig)))
    args = parser.parse_args(argv)

    from jaxllm.checkpoint import CheckpointError
    from jaxllm.config import ConfigError, closest
    from jaxllm.rlhf.ppo import ppo, reward_model_scorer
    from jaxllm.tokenizer import TokenizerError

    try:
        fields = {f.name: f for f in dataclasses.fields(PPOConfig)}
        values = {}
        for item in args.overrides:
            key, _, value = item.partition("=")
            key = key.removeprefix("ppo.")
            if key not in fields or not _:
                raise ConfigError(f"unknown setting '{item}'" + closest(key, fields))
            kind = str(fields[key].type)
            values[key] = (value.lower() in ("1", "true", "yes") if "bool" in kind else
                           int(value) if "int" in kind else float(value))
        cfg = PPOConfig(**values)
        cfg.validate()
        config, params, tok, rm_config, rm_params, texts, prompts, template = _load(args)
    except (ValueError, ConfigError, CheckpointError, TokenizerError) as err:
        print(f"jaxllm ppo: error: {err}", file=sys.stderr)
        return 2
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    import shutil
    shutil.copyfile(tok.path, run_dir / "tokenizer.model")
    same_shape = rm_config.replace(name=config.name, dtype=config.dtype) == config
    # The value model starts from the reward model when the architectures match, else from the policy.
    value = rm_params if same_shape else None
    _, _, history = ppo(config, params, prompts, reward_model_scorer(rm_config, rm_params), cfg, value=value,
                        run_dir=run_dir, stop_ids=template.stop_ids(tok), pad_id=tok.pad_id)
    _plot(history, run_dir / "ppo.png")
    print(f"policy checkpoint: {run_dir / 'checkpoints'}; metrics: {run_dir / 'ppo_metrics.jsonl'}; "
          f"plot: {run_dir / 'ppo.png'}")
    return 0


def _plot(history, path):
    if not history:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    steps = [h["iteration"] for h in history]
    for ax, key in zip(axes, ("reward", "kl", "response_length")):
        ax.plot(steps, [h[key] for h in history])
        ax.set_title(key)
        ax.set_xlabel("iteration")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
