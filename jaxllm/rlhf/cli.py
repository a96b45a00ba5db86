"""`jaxllm rejection-sample` and `jaxllm ppo`: RLHF with reward models trained by `jaxllm rm`.

    jaxllm rejection-sample                     the demo (rejection-demo): best-of-4 on the sample prompts
    jaxllm rejection-sample --policy runs/sft-demo --reward-model runs/rm-demo rejection.k=8 -o best.jsonl
    jaxllm rejection-sample ... --policy runs/rlhf-v2 --pool rs/v1.jsonl -o rs/v2.jsonl rejection.temperature=1.2
    jaxllm ppo                                  the demo (ppo-demo): from runs/sft-demo and runs/rm-demo
    jaxllm ppo llama2-7b-ppo policy=ckpt/llama2-7b-rs ppo.iterations=300

A recipe (a YAML path or a shipped recipe's name) names policy, reward_model (and, for Llama 2's two-model
reward, safety_reward_model), prompts, the mesh and a `ppo:` / `rejection:` section; `key=value` overrides
and the flags below change it. Prompts (jsonl {"prompt": ..., "safety": true|false} or one per line) default
to the shipped sample. With two reward models the score is Llama 2's: R_c = R_s if the prompt is tagged
safety or R_s < 0.15, else R_h (sigmoid scores), and PPO whitens logit(R_c).

The rejection-sampling output is an SFT dataset (`messages` format) that `jaxllm sft` consumes; --pool
names earlier iterations' outputs, whose replies are re-scored and kept when they beat the new samples.
PPO writes RUN/ppo_metrics.jsonl, resumable checkpoints in RUN/checkpoints (load the policy with
`jaxllm generate --checkpoint RUN`), RUN/ppo.yaml and RUN/ppo.png. Both run on several hosts like
`jaxllm train` (README, "Scaling out"); process 0 writes the files."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

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
    safety_threshold: float = 0.15  # with two reward models: R_s below this picks the safety score

    def validate(self) -> None:
        from jaxllm.config import ConfigError
        if self.k < 1 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise ConfigError("rejection.k, rejection.max_new_tokens and rejection.batch_size must be >= 1")
        if not 0 < self.safety_threshold < 1:
            raise ConfigError(f"rejection.safety_threshold is a sigmoid score in (0, 1), got "
                              f"{self.safety_threshold}")


@dataclasses.dataclass
class RLHFRecipe:
    """The keys of a PPO / rejection-sampling recipe (PPO uses run_dir and ppo, rejection output and
    rejection)."""
    policy: str | None = None       # starting policy: jaxllm checkpoint, training run or HF directory
    reward_model: str | None = None  # run directory of `jaxllm rm` (with two: the helpfulness model)
    safety_reward_model: str | None = None  # Llama 2's safety reward model (optional)
    prompts: str = "assets:stages/prompts.jsonl"
    tokenizer: str | None = None    # default: the policy's tokenizer.model
    run_dir: str | None = None
    output: str | None = None
    pool: list | None = None        # rejection: earlier iterations' outputs, their replies compete again
    distributed: str = "auto"       # jax.distributed.initialize(): auto (when the environment says so) | yes | no
    mesh: object = None
    ppo: object = None
    rejection: object = None
    # Architectures for `jaxllm ppo --compile-only` where the checkpoints are not on this machine:
    # {policy: {preset: NAME, ...}, reward_model: ...} (the reward model defaults to the policy's).
    models: dict | None = None
    lora: object = None             # PPO: adapters on the policy's frozen base (jaxllm/rlhf/ppo_lora.py)


def load_recipe(kind: str, recipe: str, overrides=()) -> RLHFRecipe:
    """RLHFRecipe from a recipe (path or shipped name) plus `key=value` overrides; every key is checked."""
    from jaxllm.config import ConfigError, closest
    from jaxllm.rlhf.config import PPOConfig
    from jaxllm.train.config import (MeshConfig, apply_overrides, build_section, coerce_field, find_recipe,
                                     read_yaml)

    path = find_recipe(recipe)
    data = apply_overrides(read_yaml(path), list(overrides))
    section = "ppo" if kind == "ppo" else "rejection"
    other = "rejection" if kind == "ppo" else "ppo"
    excluded = (other, "output", "pool") if kind == "ppo" else (other, "run_dir", "models", "lora")
    allowed = {f.name: f for f in dataclasses.fields(RLHFRecipe) if f.name not in excluded}
    values = {}
    for key, value in data.items():
        if key not in allowed:
            raise ConfigError(f"{path}: unknown key '{key}' for jaxllm {'ppo' if kind == 'ppo' else 'rejection-sample'}"
                              + closest(str(key), allowed) + f"; known: {', '.join(allowed)}")
        if key == "mesh":
            values[key] = build_section(MeshConfig, value or {}, "mesh")
        elif key == "lora":
            from jaxllm.lora.config import LoraConfig
            values[key] = build_section(LoraConfig, value or {}, "lora")
        elif key == section:
            values[key] = build_section(PPOConfig if kind == "ppo" else RejectionConfig, value or {}, key)
        else:
            values[key] = coerce_field(value, allowed[key].type, key)
    out = RLHFRecipe(**values)
    from jaxllm.config import check_choice
    check_choice("distributed", out.distributed, ("auto", "yes", "no"))
    if out.pool is not None and not all(isinstance(p, str) for p in out.pool):
        raise ConfigError(f"pool must be a list of files (earlier rejection-sample outputs), got {out.pool!r}")
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
    parser.add_argument("--safety-reward-model", help="Llama 2's safety reward model, combined with the "
                        "helpfulness one (same as safety_reward_model=DIR)")
    parser.add_argument("--prompts", help="jsonl with 'prompt', or text, one per line (same as prompts=FILE)")
    parser.add_argument("--tokenizer", help="default: the policy's tokenizer.model")
    parser.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")
    if kind == "ppo":
        parser.add_argument("--run-dir", help="same as run_dir=DIR")
        from jaxllm.preflight.cli import add_arguments
        add_arguments(parser)
        parser.add_argument("--prompt-tokens", type=int, metavar="N",
                            help="--compile-only: the longest prompt (default: the policy's context minus "
                                 "ppo.max_new_tokens)")
    else:
        parser.add_argument("--output", "-o", help="SFT jsonl to write (same as output=FILE)")
        parser.add_argument("--pool", action="append", metavar="FILE",
                            help="an earlier iteration's output whose replies compete with the new samples "
                                 "(repeatable; same as pool=[FILE, ...])")
        for flag, kind_ in (("--k", int), ("--temperature", float), ("--top-p", float),
                            ("--max-new-tokens", int), ("--seed", int)):
            parser.add_argument(flag, type=kind_, help=f"same as rejection.{flag[2:].replace('-', '_')}=…")
    return parser


def _recipe(kind: str, argv: list[str]):
    """(parsed args, RLHFRecipe) from the command line."""
    from jaxllm.train.config import recipe_and_overrides
    parser = _parser(kind)
    args = parser.parse_intermixed_args(argv)  # flags and key=value in any order
    options = {flag: getattr(args, flag, None) for flag in
               ("policy", "reward_model", "safety_reward_model", "prompts", "tokenizer", "run_dir", "output")}
    if getattr(args, "pool", None):
        options["pool"] = json.dumps(args.pool)
    if kind == "rejection":
        options.update({f"rejection.{flag}": getattr(args, flag)
                        for flag in ("k", "temperature", "top_p", "max_new_tokens", "seed")})
    recipe, overrides = recipe_and_overrides(args.args, parser.error, **options)
    if kind == "ppo":
        from jaxllm.preflight.cli import topology_from_args
        args.target = topology_from_args(args, parser.error)
        if args.prompt_tokens is not None and args.target is None:
            parser.error("--prompt-tokens needs --compile-only")
    return args, load_recipe(kind, recipe or DEFAULTS[kind], overrides)


@dataclasses.dataclass
class Loaded:
    """What both commands read: the mesh, the policy, its tokenizer and template, the prompts (texts, their
    safety tags and ids) and the reward models ((config, params) each; a second one is the safety model)."""
    mesh: object
    config: object
    params: object
    tok: object
    template: object
    texts: list
    safety: list
    prompts: list
    reward_models: list

    def scorer(self, threshold: float):
        """The reward: one model's raw score, or Llama 2's combination of helpfulness and safety."""
        from jaxllm.rlhf.rewards import llama2_scorer, reward_model_scorer
        scorers = [reward_model_scorer(c, p, self.mesh) for c, p in self.reward_models]
        return scorers[0] if len(scorers) == 1 else llama2_scorer(*scorers, threshold=threshold)


def _load(recipe: RLHFRecipe) -> Loaded:
    from jaxllm.config import ConfigError
    from jaxllm.data import resolve_path
    from jaxllm.inference.loading import load_model
    from jaxllm.rlhf.prompts import read_prompts
    from jaxllm.sharding import make_mesh
    from jaxllm.stages import reward
    from jaxllm.tokenizer import get_chat_template, template_for_family
    from jaxllm.train.engine import maybe_initialize_distributed

    maybe_initialize_distributed(recipe.distributed)  # several processes: before the mesh spans their devices
    try:
        mesh = make_mesh(recipe.mesh.data, recipe.mesh.fsdp, recipe.mesh.tensor)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    texts, safety = read_prompts(resolve_path(recipe.prompts))
    tokenizer = resolve_path(recipe.tokenizer) if recipe.tokenizer else None
    if getattr(recipe, "lora", None) is not None:  # PPO reads the base itself, quantized (`ppo_lora`)
        from jaxllm.rlhf.ppo_lora import base_config
        (config, tok), params = base_config(resolve_path(recipe.policy), tokenizer), None
    else:
        config, params, tok = load_model(resolve_path(recipe.policy), tokenizer=tokenizer, mesh=mesh)
    if tok is None:
        raise ValueError(f"{recipe.policy}: no tokenizer.model stored with it; set tokenizer=…")
    reward_models = []
    for key in ("reward_model", "safety_reward_model"):
        if getattr(recipe, key):
            rm_config, rm_params = reward.load(resolve_path(getattr(recipe, key)), mesh=mesh)
            if rm_config.vocab_size != config.vocab_size:
                raise ValueError(f"{key} {getattr(recipe, key)}: vocabulary of {rm_config.vocab_size} rows differs "
                                 f"from the policy's ({config.vocab_size})")
            reward_models.append((rm_config, rm_params))
    template = get_chat_template(template_for_family(config.family))
    prompts = [template.prompt(tok, [{"role": "user", "content": t}]) for t in texts]
    return Loaded(mesh, config, params, tok, template, texts, safety, prompts, reward_models)


def _errors():
    from jaxllm.checkpoint import CheckpointError
    from jaxllm.config import ConfigError
    from jaxllm.tokenizer import TokenizerError
    return ValueError, ConfigError, CheckpointError, TokenizerError, FileNotFoundError


def write_sft(path, records) -> None:
    """Write SFT records (one JSON object per line) to `path` atomically: a complete file or the old one."""
    from jaxllm import storage
    storage.write_lines_atomic(path, (json.dumps(record, ensure_ascii=False) for record in records))


def sft_record(prompt: str, reply: str, reward: float, **info) -> dict:
    """A kept reply as a `messages` SFT record, with its reward and provenance (`info`)."""
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}],
            "reward": reward, **info}


def reply_ids(tok, template, prompt: str, reply: str) -> tuple[list[int], list[int]]:
    """(prompt ids, reply ids) of a stored reply, rendered by the chat template as SFT and the reward model
    see it (the reply's ids are what follows the prompt's in the rendered conversation)."""
    prompt_ids = template.prompt(tok, [{"role": "user", "content": prompt}])
    ids, _ = template.render(tok, [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}])
    common = next((i for i, (a, b) in enumerate(zip(prompt_ids, ids)) if a != b), min(len(prompt_ids), len(ids)))
    return ids[:common], ids[common:]


def _pooled(pool, loaded: Loaded):
    """(pool entries used, with the prompt each serves; pool indices per prompt; their prompt ids and reply
    ids) for the pooled replies whose prompt is among this run's prompts; a pooled reply the template
    refuses is an error naming its line."""
    from jaxllm.tokenizer import TokenizerError

    where = {}
    for i, text in enumerate(loaded.texts):
        where.setdefault(text, []).append(i)
    per_prompt = [[] for _ in loaded.texts]
    used, prompt_ids, replies = [], [], []
    for entry in pool:
        if entry.prompt not in where:
            continue
        try:
            p, r = reply_ids(loaded.tok, loaded.template, entry.prompt, entry.reply)
        except TokenizerError as err:
            raise ValueError(f"{entry.where}: {err}") from None
        for i in where[entry.prompt]:
            per_prompt[i].append(len(used))
            used.append((entry, i))
            prompt_ids.append(p)
            replies.append(r)
    return used, per_prompt, prompt_ids, replies


def rejection_main(argv: list[str]) -> int:
    try:
        args, recipe = _recipe("rejection", argv)
        if args.print_config:
            print(to_yaml(recipe), end="")
            return 0
        from jaxllm.data import resolve_path
        from jaxllm.rlhf.prompts import read_pool
        pool = read_pool([resolve_path(p) for p in recipe.pool or ()])  # before the models: fail fast
        loaded = _load(recipe)
        used, per_prompt, pool_prompts, pool_replies = _pooled(pool, loaded)
    except _errors() as err:
        print(f"jaxllm rejection-sample: error: {err}", file=sys.stderr)
        return 2
    import jax

    from jaxllm.distributed import is_primary
    from jaxllm.inference import SamplingParams
    from jaxllm.rlhf.rejection import best_of_k, keep_best, reward_vs_k, score_replies, unit_count
    from jaxllm.stages.data import reply_text
    from jaxllm.train.engine import Shards

    rc, tok, template = recipe.rejection, loaded.tok, loaded.template
    scorer = loaded.scorer(rc.safety_threshold)
    sampling = SamplingParams(temperature=rc.temperature, top_p=rc.top_p, max_new_tokens=rc.max_new_tokens)

    def render(i, ids):  # samples compete as the conversations SFT will train on, like the pooled replies
        reply = reply_text(ids, tok, template)
        return None if reply is None else reply_ids(tok, template, loaded.texts[i], reply)

    # Finished units of sampling beside the output: a killed run resumes, and writes what an uninterrupted
    # one would (the same recipe and prompts; anything else starts over).
    output = resolve_path(recipe.output)
    shards = Shards(f"{output}.parts", {"recipe": yaml.safe_load(to_yaml(recipe)), "prompts": loaded.prompts},
                    unit_count(len(loaded.prompts), rc.k, rc.batch_size))
    results = best_of_k(loaded.config, loaded.params, loaded.prompts, scorer, rc.k, sampling, jax.random.key(rc.seed),
                        stop_ids=template.stop_ids(tok), pad_id=tok.pad_id, batch_size=rc.batch_size,
                        mesh=loaded.mesh, vocab_limit=tok.vocab_size, safety=loaded.safety, render=render,
                        shards=shards)
    pool_scores = score_replies(scorer, pool_prompts, pool_replies, pad_id=tok.pad_id, batch_size=rc.batch_size,
                                safety=[loaded.safety[i] for _, i in used], mesh=loaded.mesh)
    kept = keep_best(results, per_prompt, pool_scores)
    iteration = 1 + max((entry.iteration for entry, _ in used), default=0)
    records = []
    for text, best in zip(loaded.texts, kept):
        if best is None:  # no usable sample and nothing pooled
            continue
        if best.pooled is None:  # `render` let only usable replies be kept
            reply, sampled = reply_text(best.ids, tok, template), {"from_iteration": iteration,
                                                                      "temperature": rc.temperature, "k": rc.k}
        else:
            entry = used[best.pooled][0]
            reply, sampled = entry.reply, {"from_iteration": entry.iteration, **dict(entry.sampling)}
        records.append(sft_record(text, reply, best.score, iteration=iteration, **sampled))
    skipped = len(kept) - len(records)
    if not is_primary():  # every process holds the same results; one writes them
        return 0
    write_sft(output, records)
    shards.remove()
    print(f"{'k':>3} {'mean max reward':>16} {'mean median reward':>19}")
    for row in reward_vs_k([scores for _, _, scores in results]):
        print(f"{row['k']:>3} {row['max']:>16.4f} {row['median']:>19.4f}")
    if used:
        from_pool = sum(best is not None and best.pooled is not None for best in kept)
        print(f"pool: {len(used)} earlier replies re-scored; {from_pool} of {len(kept)} prompts keep one")
    print(f"wrote {len(records)} best-of-{rc.k} examples (iteration {iteration}) to {output}"
          + (f"; {skipped} prompts skipped (no usable reply among their {rc.k} samples)" if skipped else ""))
    return 0


# Settings a resumed PPO run may change; any other difference means another run.
RESUMABLE = ("run_dir", "mesh.", "distributed", "ppo.iterations", "ppo.save_every", "ppo.generation",
             "ppo.generation_chunks", "models.")


def _claim_run_dir(recipe: RLHFRecipe):
    """(RUN, its lock): create RUN (or check that RUN/ppo.yaml describes the same run), lock it and write the
    resolved recipe; every process checks, process 0 writes."""
    from jaxllm import storage
    from jaxllm.config import ConfigError
    from jaxllm.data import resolve_path
    from jaxllm.distributed import is_primary, sync
    from jaxllm.train import rundir
    from jaxllm.train.config import config_differences
    from jaxllm.train.engine import write_run_file

    storage.check_bucket(recipe.run_dir)
    run_dir = storage.path(resolve_path(recipe.run_dir))  # pathlib.Path, or epath.Path keeping gs://
    path = run_dir / "ppo.yaml"
    text = to_yaml(recipe)
    if storage.is_file(path):
        diffs = config_differences(yaml.safe_load(storage.read_text(path)) or {}, yaml.safe_load(text), RESUMABLE)
        if diffs:
            raise ConfigError(f"run directory {run_dir} holds a PPO run with a different recipe ({'; '.join(diffs[:6])})"
                              f"; choose another run_dir=… or remove {run_dir}")
    elif storage.is_dir(run_dir / "checkpoints") and storage.listdir(run_dir / "checkpoints"):
        raise ConfigError(f"run directory {run_dir} has checkpoints but no ppo.yaml; choose another run_dir=…")
    sync("jaxllm ppo run dir checked")  # no process reads ppo.yaml after process 0 rewrote it
    held = rundir.lock(run_dir)  # one writer per run directory (process 0 holds it for all), for the run
    if is_primary():
        write_run_file(path, text)
    return run_dir, held


def ppo_main(argv: list[str]) -> int:
    try:
        args, recipe = _recipe("ppo", argv)
        if args.print_config:
            print(to_yaml(recipe), end="")
            return 0
        if args.target is not None:
            return _preflight(recipe, args)
        loaded = _load(recipe)
        from jaxllm.rlhf.ppo import Layout
        from jaxllm.rlhf.ppo_lora import LoraPolicy
        from jaxllm.data import resolve_path
        Layout.check_batch(recipe.ppo, loaded.mesh)
        parts = recipe.lora and LoraPolicy(loaded.config, resolve_path(recipe.policy), recipe.lora, loaded.mesh,
                                           recipe.ppo.seed)
        run_dir, run_lock = _claim_run_dir(recipe)
    except _errors() as err:
        print(f"jaxllm ppo: error: {err}", file=sys.stderr)
        return 2
    from jaxllm.distributed import is_primary
    from jaxllm.rlhf.ppo import ppo
    from jaxllm.train import rundir

    tok, template, config = loaded.tok, loaded.template, loaded.config
    # The policy's tokenizer with its HF files and remote code, so an export of the run loads like the policy
    rundir.copy_tokenizer(run_dir, tok.path)
    rundir.copy_model_files(run_dir, tok.path, recipe.policy)
    rm_config, rm_params = loaded.reward_models[0]
    same_shape = rm_config.replace(name=config.name, dtype=config.dtype) == config
    # The value model starts from the (helpfulness) reward model when the architectures match, else from
    # the policy.
    value = rm_params if same_shape and parts is None else None
    try:
        result = ppo(config, loaded.params, loaded.prompts, loaded.scorer(recipe.ppo.safety_threshold), recipe.ppo,
                     value=value, mesh=loaded.mesh, run_dir=run_dir, stop_ids=template.stop_ids(tok),
                     pad_id=tok.pad_id, vocab_limit=tok.vocab_size, safety=loaded.safety, run_lock=run_lock,
                     parts=parts)
    finally:
        run_lock.release()
    if is_primary():
        from jaxllm.rlhf.plot import plot_history
        plot_history(result[2], run_dir / "ppo.png")
        print(f"policy checkpoint: {run_dir / 'checkpoints'}; metrics: {run_dir / 'ppo_metrics.jsonl'}, "
              f"tensorboard {run_dir / 'tb'}; plot: {run_dir / 'ppo.png'}")
    return result.exit_code


def _preflight(recipe: RLHFRecipe, args) -> int:
    """`jaxllm ppo --compile-only`: one iteration compiled for --topology, nothing loaded or run."""
    from jaxllm.preflight.ppo import preflight_ppo, recipe_models
    from jaxllm.preflight.cli import finish

    policy, reward_models = recipe_models(recipe)
    report = preflight_ppo(policy, reward_models, recipe.ppo, recipe.mesh, args.target, args.prompt_tokens,
                           lora=recipe.lora, base=recipe.policy)
    return finish(report, args, "jaxllm ppo")

