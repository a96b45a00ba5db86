"""`jaxllm rejection-sample` and `jaxllm ppo`: RLHF with a reward model trained by `jaxllm rm`.

    jaxllm rejection-sample                     the demo (rejection-demo): best-of-4 on the sample prompts
    jaxllm rejection-sample --policy runs/sft-demo --reward-model runs/rm-demo rejection.k=8 -o best.jsonl
    jaxllm ppo                                  the demo (ppo-demo): from runs/sft-demo and runs/rm-demo
    jaxllm ppo llama2-7b-ppo policy=ckpt/llama2-7b-rs reward_model=runs/llama2-7b-rm ppo.iterations=300

A recipe (a YAML path or a shipped recipe's name) names policy, reward_model, prompts, the mesh and a
`ppo:` / `rejection:` section; `key=value` overrides and the flags below change it. Prompts default to the
shipped sample (jaxllm/assets/stages/prompts.jsonl). The rejection-sampling output is an SFT dataset
(`messages` format) that `jaxllm sft` consumes. PPO writes RUN/ppo_metrics.jsonl, resumable checkpoints in
RUN/checkpoints (load the policy with `jaxllm generate --checkpoint RUN`), RUN/ppo.yaml and RUN/ppo.png."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import yaml

DEFAULTS = {"ppo": "ppo-demo", "rejection": "rejection-demo"}


@dataclasses.dataclass(frozen=True)
class RejectionConfig:
    k: int = 4                      # samples per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    batch_size: int = 32            # samples per generation batch
    seed: int = 0

    def validate(self) -> None:
        from jaxllm.config import ConfigError
        if self.k < 1 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise ConfigError("rejection.k, rejection.max_new_tokens and rejection.batch_size must be >= 1")


@dataclasses.dataclass
class RLHFRecipe:
    """The keys of a PPO / rejection-sampling recipe (PPO uses run_dir and ppo, rejection output and
    rejection)."""
    policy: str | None = None       # starting policy: jaxllm checkpoint, training run or HF directory
    reward_model: str | None = None  # run directory of `jaxllm rm`
    prompts: str = "assets:stages/prompts.jsonl"
    tokenizer: str | None = None    # default: the policy's tokenizer.model
    run_dir: str | None = None
    output: str | None = None
    mesh: object = None
    ppo: object = None
    rejection: object = None


def load_recipe(kind: str, recipe: str, overrides=()) -> RLHFRecipe:
    """RLHFRecipe from a recipe (path or shipped name) plus `key=value` overrides; every key is checked."""
    from jaxllm.config import ConfigError, closest
    from jaxllm.rlhf.ppo import PPOConfig
    from jaxllm.train.config import (MeshConfig, apply_overrides, build_section, coerce_field, find_recipe,
                                     read_yaml)

    path = find_recipe(recipe)
    data = apply_overrides(read_yaml(path), list(overrides))
    section = "ppo" if kind == "ppo" else "rejection"
    other = "rejection" if kind == "ppo" else "ppo"
    allowed = {f.name: f for f in dataclasses.fields(RLHFRecipe)
               if f.name not in (other, "output" if kind == "ppo" else "run_dir")}
    values = {}
    for key, value in data.items():
        if key not in allowed:
            raise ConfigError(f"{path}: unknown key '{key}' for jaxllm {'ppo' if kind == 'ppo' else 'rejection-sample'}"
                              + closest(str(key), allowed) + f"; known: {', '.join(allowed)}")
        if key == "mesh":
            values[key] = build_section(MeshConfig, value or {}, "mesh")
        elif key == section:
            values[key] = build_section(PPOConfig if kind == "ppo" else RejectionConfig, value or {}, key)
        else:
            values[key] = coerce_field(value, allowed[key].type, key)
    out = RLHFRecipe(**values)
    out.mesh = out.mesh or MeshConfig()
    setattr(out, section, getattr(out, section) or (PPOConfig() if kind == "ppo" else RejectionConfig()))
    getattr(out, section).validate()
    for key in ("policy", "reward_model", "run_dir" if kind == "ppo" else "output"):
        if not getattr(out, key):
            raise ConfigError(f"{key} is not set: give it in the recipe, as {key}=… or as --{key.replace('_', '-')}")
    return out


def to_yaml(recipe: RLHFRecipe) -> str:
    data = {k: v for k, v in dataclasses.asdict(recipe).items() if v is not None}
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def _parser(kind: str) -> argparse.ArgumentParser:
    name = "ppo" if kind == "ppo" else "rejection-sample"
    parser = argparse.ArgumentParser(prog=f"jaxllm {name}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("args", nargs="*", metavar="RECIPE|key=value",
                        help=f"a YAML recipe or a shipped recipe's name (default: {DEFAULTS[kind]}), then overrides "
                             f"(e.g. {kind}.KEY=VALUE)")
    parser.add_argument("--policy", help="starting policy: jaxllm checkpoint or run dir (same as policy=DIR)")
    parser.add_argument("--reward-model", help="run dir of `jaxllm rm` (same as reward_model=DIR)")
    parser.add_argument("--prompts", help="jsonl with 'prompt', or text, one per line (same as prompts=FILE)")
    parser.add_argument("--tokenizer", help="default: the policy's tokenizer.model")
    parser.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")
    if kind == "ppo":
        parser.add_argument("--run-dir", help="same as run_dir=DIR")
    else:
        parser.add_argument("--output", "-o", help="SFT jsonl to write (same as output=FILE)")
        for flag, kind_ in (("--k", int), ("--temperature", float), ("--top-p", float),
                            ("--max-new-tokens", int), ("--seed", int)):
            parser.add_argument(flag, type=kind_, help=f"same as rejection.{flag[2:].replace('-', '_')}=…")
    return parser


def _recipe(kind: str, argv: list[str]):
    """(parsed args, RLHFRecipe) from the command line."""
    from jaxllm.train.config import recipe_and_overrides
    parser = _parser(kind)
    args = parser.parse_intermixed_args(argv)  # flags and key=value in any order
    options = {flag: getattr(args, flag, None)
               for flag in ("policy", "reward_model", "prompts", "tokenizer", "run_dir", "output")}
    if kind == "rejection":
        options.update({f"rejection.{flag}": getattr(args, flag)
                        for flag in ("k", "temperature", "top_p", "max_new_tokens", "seed")})
    recipe, overrides = recipe_and_overrides(args.args, parser.error, **options)
    return args, load_recipe(kind, recipe or DEFAULTS[kind], overrides)


def _load(recipe: RLHFRecipe):
    from jaxllm.config import ConfigError
    from jaxllm.data import resolve_path
    from jaxllm.inference.generate_cli import read_prompts
    from jaxllm.inference.loading import load_model
    from jaxllm.sharding import make_mesh
    from jaxllm.stages import reward
    from jaxllm.tokenizer import get_chat_template, template_for_family

    try:
        mesh = make_mesh(recipe.mesh.data, recipe.mesh.fsdp, recipe.mesh.tensor)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    tokenizer = resolve_path(recipe.tokenizer) if recipe.tokenizer else None
    config, params, tok = load_model(resolve_path(recipe.policy), tokenizer=tokenizer, mesh=mesh)
    if tok is None:
        raise ValueError(f"{recipe.policy}: no tokenizer.model stored with it; set tokenizer=…")
    rm_config, rm_params = reward.load(resolve_path(recipe.reward_model), mesh=mesh)
    if rm_config.vocab_size != config.vocab_size:
        raise ValueError(f"reward model vocabulary ({rm_config.vocab_size}) differs from the policy's "
                         f"({config.vocab_size})")
    texts = read_prompts(resolve_path(recipe.prompts))
    template = get_chat_template(template_for_family(config.family))
    prompts = [template.prompt(tok, [{"role": "user", "content": t}]) for t in texts]
    return mesh, config, params, tok, rm_config, rm_params, texts, prompts, template


def _errors():
    from jaxllm.checkpoint import CheckpointError
    from jaxllm.config import ConfigError
    from jaxllm.tokenizer import TokenizerError
    return ValueError, ConfigError, CheckpointError, TokenizerError, FileNotFoundError


def write_sft(path, texts, results, tok, template) -> tuple[int, int]:
    """Write the kept samples as `messages` SFT records (with their reward); (written, prompts skipped
    because none of their samples had a usable reply)."""
    written = 0
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for text, (ids, score, _) in zip(texts, results):
            reply = usable_reply(ids, tok, template) if ids is not None else None
            if reply is None:
                continue
            f.write(json.dumps({"messages": [{"role": "user", "content": text},
                                             {"role": "assistant", "content": reply}],
                                "reward": score}, ensure_ascii=False) + "\n")
            written += 1
    return written, len(results) - written


def usable_reply(ids, tok, template) -> str | None:
    """The reply text of sampled ids (stop ids dropped), or None when SFT could not use it: blank, or
    refused by the chat template (e.g. a Llama 2 tag inside it)."""
    from jaxllm.tokenizer import TokenizerError

    stops = set(template.stop_ids(tok))
    reply = tok.decode([i for i in ids if i not in stops]).strip()
    if not reply:
        return None
    try:
        template.render(tok, [{"role": "user", "content": "?"}, {"role": "assistant", "content": reply}])
    except TokenizerError:
        return None
    return reply


def rejection_main(argv: list[str]) -> int:
    try:
        args, recipe = _recipe("rejection", argv)
        if args.print_config:
            print(to_yaml(recipe), end="")
            return 0
        mesh, config, params, tok, rm_config, rm_params, texts, prompts, template = _load(recipe)
    except _errors() as err:
        print(f"jaxllm rejection-sample: error: {err}", file=sys.stderr)
        return 2
    import jax

    from jaxllm.data import resolve_path
    from jaxllm.inference import SamplingParams
    from jaxllm.rlhf.ppo import reward_model_scorer
    from jaxllm.rlhf.rejection import best_of_k, reward_vs_k

    rc = recipe.rejection
    sampling = SamplingParams(temperature=rc.temperature, top_p=rc.top_p, max_new_tokens=rc.max_new_tokens)
    results = best_of_k(config, params, prompts, reward_model_scorer(rm_config, rm_params, mesh), rc.k, sampling,
                        jax.random.key(rc.seed), stop_ids=template.stop_ids(tok), pad_id=tok.pad_id,
                        batch_size=rc.batch_size, mesh=mesh, vocab_limit=tok.vocab_size,
                        accept=lambda ids: usable_reply(ids, tok, template) is not None)
    output = resolve_path(recipe.output)
    written, skipped = write_sft(output, texts, results, tok, template)
    print(f"{'k':>3} {'mean max reward':>16} {'mean median reward':>19}")
    for row in reward_vs_k([scores for _, _, scores in results]):
        print(f"{row['k']:>3} {row['max']:>16.4f} {row['median']:>19.4f}")
    print(f"wrote {written} best-of-{rc.k} examples to {output}"
          + (f"; {skipped} prompts skipped (no usable reply among their {rc.k} samples)" if skipped else ""))
    return 0


# Settings a resumed PPO run may change; any other difference means another run.
RESUMABLE = ("run_dir", "mesh.", "ppo.iterations", "ppo.save_every")


def _claim_run_dir(recipe: RLHFRecipe) -> Path:
    """Create RUN (or check that RUN/ppo.yaml describes the same run) and write the resolved recipe."""
    from jaxllm.config import ConfigError
    from jaxllm.data import resolve_path
    from jaxllm.train import rundir
    from jaxllm.train.config import config_differences

    run_dir = Path(resolve_path(recipe.run_dir))
    path = run_dir / "ppo.yaml"
    text = to_yaml(recipe)
    if path.is_file():
        diffs = config_differences(yaml.safe_load(path.read_text("utf-8")) or {}, yaml.safe_load(text), RESUMABLE)
        if diffs:
            raise ConfigError(f"run directory {run_dir} holds a PPO run with a different recipe ({'; '.join(diffs[:6])})"
                              f"; choose another run_dir=… or remove {run_dir}")
    elif (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()):
        raise ConfigError(f"run directory {run_dir} has checkpoints but no ppo.yaml; choose another run_dir=…")
    run_dir.mkdir(parents=True, exist_ok=True)
    rundir.lock(run_dir)  # one writer per run directory, held until the process ends
    path.write_text(text, encoding="utf-8")
    return run_dir


def ppo_main(argv: list[str]) -> int:
    try:
        args, recipe = _recipe("ppo", argv)
        if args.print_config:
            print(to_yaml(recipe), end="")
            return 0
        mesh, config, params, tok, rm_config, rm_params, texts, prompts, template = _load(recipe)
        from jaxllm.rlhf.ppo import _Layout
        _Layout.check_batch(recipe.ppo, mesh)
        run_dir = _claim_run_dir(recipe)
    except _errors() as err:
        print(f"jaxllm ppo: error: {err}", file=sys.stderr)
        return 2
    import shutil

    from jaxllm.rlhf.ppo import ppo, reward_model_scorer

    shutil.copyfile(tok.path, run_dir / "tokenizer.model")
    same_shape = rm_config.replace(name=config.name, dtype=config.dtype) == config
    # The value model starts from the reward model when the architectures match, else from the policy.
    value = rm_params if same_shape else None
    _, _, history = ppo(config, params, prompts, reward_model_scorer(rm_config, rm_params, mesh), recipe.ppo,
                        value=value, mesh=mesh, run_dir=run_dir, stop_ids=template.stop_ids(tok), pad_id=tok.pad_id,
                        vocab_limit=tok.vocab_size)
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
