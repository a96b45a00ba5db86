"""Run configuration: dataclasses for a training run, YAML recipes, `key=value` overrides.

A recipe is YAML with the sections below; every key is checked, and an unknown one is an error that names
it and suggests the closest known key. The `model:` section is either `preset: NAME` plus field overrides
or the full `ModelConfig` fields. Training computes in bfloat16 with float32 parameters and optimizer
state unless the recipe sets `model.dtype` / `model.param_dtype`.

    run_dir: runs/demo          seed: 0          init_from: null (a jaxllm checkpoint to start from)
    model:      {preset: demo, dtype: float32, ...}
    data:       {sources: [{path, weight, name, format, text_field, text_split, holdout}], tokenizer, ...}
    optimizer:  {lr, schedule, warmup_steps, warmup_fraction, decay_steps, min_lr_ratio, b1, b2, eps,
                 weight_decay, clip_norm}
    mesh:       {data, fsdp, tensor}           (-1: the remaining devices)
    train:      {steps, batch_size, grad_accum, max_nan_streak, final_eval, profile}
    checkpoint: {every, keep, async_save}
    log:        {every, progress, tensorboard, plot, peak_tflops}
    lora:       {rank, alpha, dropout, targets, train, base_dtype, init_adapter}   (absent: full fine-tuning)
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from jaxllm.config import (ConfigError, ModelConfig, apply_overrides, check_choice, closest, coerce_field, flatten,
                           read_yaml, unknown_key)
from jaxllm.data.config import DataConfig, SourceConfig
from jaxllm.lora.config import LoraConfig

SCHEDULES = ("cosine", "linear", "constant")
DISTRIBUTED = ("auto", "yes", "no")
# Training defaults for the model section: compute in bf16, keep parameters (and so Adam moments) in fp32.
TRAIN_MODEL_DEFAULTS = {"dtype": "bfloat16", "param_dtype": "float32"}


@dataclass
class OptimizerConfig:
    """AdamW with global-norm clipping and linear warmup; defaults are Llama 2's pretraining (spec §3.3)."""
    lr: float = 3e-4
    schedule: str = "cosine"          # cosine: warmup, then cosine to min_lr_ratio·lr; linear; constant
    warmup_steps: int = 2000
    warmup_fraction: float | None = None  # warmup = max(warmup_steps, ⌈fraction · decay_steps⌉), e.g. 3 % min 5
    decay_steps: int | None = None    # length of the schedule, warmup included; null: train.steps
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-5
    weight_decay: float = 0.1         # not applied to norm scales
    clip_norm: float | None = 1.0


@dataclass
class MeshConfig:
    data: int = 1
    fsdp: int = -1
    tensor: int = 1


@dataclass
class TrainConfig:
    steps: int = 1000
    epochs: float | None = None       # SFT/DPO/RM: passes over the stage's rows; sets steps (and decay_steps)
    batch_size: int = 8               # rows per optimizer step, over all hosts
    grad_accum: int = 1               # micro-batches per step (batch_size / grad_accum rows each)
    max_nan_streak: int = 10          # consecutive non-finite losses that stop the run (after a save)
    profile: str | None = None        # START:STOP: a jax.profiler trace of those steps into RUN/tb (TensorBoard)
    # `jaxllm train`, after a finished run: {heldout: true (perplexity on the sources' `holdout` slices),
    # prompts: [greedy samples], max_new_tokens: 48}, printed and written as metrics.jsonl's last record
    final_eval: dict | None = None


@dataclass
class CheckpointConfig:
    every: int = 1000
    keep: int | None = 3              # most recent checkpoints kept (null: all)
    async_save: bool = True


@dataclass
class LogConfig:
    every: int = 10
    progress: bool = True             # tqdm bar
    tensorboard: bool = True
    plot: bool = True                 # RUN/loss.png at the end
    peak_tflops: float | None = None  # per device, for MFU; null: from the device kind


@dataclass
class RunConfig:
    run_dir: str = "runs/run"
    seed: int = 0
    init_from: str | None = None
    distributed: str = "auto"         # jax.distributed.initialize(): auto (when the environment says so)
    model: ModelConfig = field(default_factory=lambda: ModelConfig(**TRAIN_MODEL_DEFAULTS))
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    stage: dict | None = None         # a stage's own options (SFT/DPO/RM), recorded so a resume keeps them
    lora: LoraConfig | None = None    # LoRA on a frozen base; sets model.lora
    stage_name: str | None = None     # the stage that trains the run (pretrain, sft, dpo, rm); set by train()

    @property
    def base_model(self) -> ModelConfig:
        """The model `init_from` holds: `model` without its adapters."""
        return self.model.replace(lora=None)

    def frozen_split(self):  # the trainable / frozen split (`jaxllm.train.split`) a section asks for, or None
        return None if self.lora is None else self.lora.split

    def validate(self) -> "RunConfig":
        t, o = self.train, self.optimizer
        for name, value in (("train.steps", t.steps), ("train.batch_size", t.batch_size),
                            ("train.grad_accum", t.grad_accum), ("train.max_nan_streak", t.max_nan_streak),
                            ("checkpoint.every", self.checkpoint.every), ("log.every", self.log.every)):
            if value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if t.epochs is not None and not t.epochs > 0:
            raise ConfigError(f"train.epochs must be > 0 or null, got {t.epochs}")
        if t.batch_size % t.grad_accum:
            raise ConfigError(f"train.grad_accum={t.grad_accum} does not divide train.batch_size={t.batch_size}")
        chunk = self.model.loss_chunk
        if chunk and chunk < self.data.seq_len and self.data.seq_len % chunk:
            raise ConfigError(f"model.loss_chunk={chunk} does not divide data.seq_len={self.data.seq_len}")
        check_choice("optimizer.schedule", o.schedule, SCHEDULES)
        if o.warmup_fraction is not None and not 0 <= o.warmup_fraction < 1:
            raise ConfigError(f"optimizer.warmup_fraction must be in [0, 1) or null, got {o.warmup_fraction}")
        if o.lr < 0 or o.warmup_steps < 0 or not 0 <= o.min_lr_ratio <= 1:
            raise ConfigError(f"optimizer: need lr >= 0, warmup_steps >= 0, 0 <= min_lr_ratio <= 1; got "
                              f"lr={o.lr}, warmup_steps={o.warmup_steps}, min_lr_ratio={o.min_lr_ratio}")
        if o.decay_steps is not None and o.decay_steps <= o.warmup_steps and o.schedule != "constant":
            raise ConfigError(f"optimizer.decay_steps={o.decay_steps} (default: train.steps) must exceed "
                              f"optimizer.warmup_steps={o.warmup_steps}; lower the warmup for short runs")
        if t.final_eval is not None:
            self._check_final_eval(t.final_eval)
        parse_window(t.profile)
        if self.checkpoint.keep is not None and self.checkpoint.keep < 1:
            raise ConfigError(f"checkpoint.keep must be >= 1 or null, got {self.checkpoint.keep}")
        check_choice("distributed", self.distributed, DISTRIBUTED)
        if self.lora is not None:
            self.lora.validate()
            if self.model.lora != self.lora.spec():
                self.model = self.model.replace(lora=self.lora.spec())
        elif self.model.lora is not None:
            self.model = self.base_model
        if self.data.sources:  # stages with their own data leave this empty
            self.data.validate()
            if self.data.seq_len > self.model.max_position_embeddings:
                raise ConfigError(f"data.seq_len={self.data.seq_len} exceeds model.max_position_embeddings="
                                  f"{self.model.max_position_embeddings}")
        return self

    def _check_final_eval(self, spec: dict) -> None:
        known = ("heldout", "prompts", "max_new_tokens", "repetition_penalty")
        for key in spec:
            if key not in known:
                raise unknown_key(f"train.final_eval.{key}", known)
        if not isinstance(spec.get("heldout", False), bool):
            raise ConfigError(f"train.final_eval.heldout must be true or false, got {spec['heldout']!r}")
        prompts = spec.get("prompts", [])
        if not (isinstance(prompts, list) and all(isinstance(p, str) and p for p in prompts)):
            raise ConfigError(f"train.final_eval.prompts must be a list of non-empty strings, got {prompts!r}")
        tokens = spec.get("max_new_tokens", 48)
        if not (isinstance(tokens, int) and not isinstance(tokens, bool) and tokens >= 1):
            raise ConfigError(f"train.final_eval.max_new_tokens must be an integer >= 1, got {tokens!r}")
        penalty = spec.get("repetition_penalty", 1.0)
        if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or penalty < 1:
            raise ConfigError(f"train.final_eval.repetition_penalty must be a number >= 1 (1: none), got {penalty!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every value (the model section in full, its adapters in `lora`), as written to
        RUN/config.yaml."""
        out = dataclasses.asdict(self)
        out["model"].pop("lora", None)
        if out["lora"] is None:
            del out["lora"]  # full fine-tuning: as before LoRA existed, so older run directories resume
        for key in ("final_eval", "profile"):  # likewise for the options added since
            if out["train"][key] is None:
                del out["train"][key]
        for source in out["data"]["sources"]:
            if not source["holdout"]:
                del source["holdout"]
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


def parse_window(spec: str | None, name: str = "train.profile") -> tuple[int, int] | None:
    """(start, stop) from "START:STOP" (0 <= START < STOP), None for no window."""
    if spec in (None, "", "none", "off"):
        return None
    try:
        start, stop = (int(part) for part in str(spec).split(":"))
    except ValueError:
        raise ConfigError(f"{name} must be START:STOP (steps, e.g. 10:15), got {spec!r}") from None
    if not 0 <= start < stop:
        raise ConfigError(f"{name} must be START:STOP with 0 <= START < STOP, got {spec!r}")
    return start, stop


# ---------------------------------------------------------------------------------------------------------
# Loading: YAML → checked dict → dataclasses.

_SECTIONS = {"data": DataConfig, "optimizer": OptimizerConfig, "mesh": MeshConfig, "train": TrainConfig,
             "checkpoint": CheckpointConfig, "log": LogConfig, "lora": LoraConfig}
_MODEL_KEYS = ["preset"] + [f.name for f in dataclasses.fields(ModelConfig) if f.name != "lora"]


def build_section(cls, data, path: str):
    """A config dataclass from a recipe mapping: unknown keys and mistyped values raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{path}.{key}" if path else str(key)
        if key not in fields:
            raise unknown_key(full, list(fields))
        if cls is DataConfig and key == "sources":
            kwargs[key] = _build_sources(value, full)
        else:
            kwargs[key] = coerce_field(value, fields[key].type, full)
    return cls(**kwargs)


def _build_sources(value, path: str) -> list[SourceConfig]:
    if isinstance(value, (str, dict)):
        value = [value]
    if not isinstance(value, list):
        raise ConfigError(f"{path} must be a list of {{path: FILE_OR_GLOB, weight: W}}, got {value!r}")
    out = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            item = {"path": item}
        source = build_section(SourceConfig, item, f"{path}.{i}")
        if not isinstance(source.path, (str, list)):
            raise ConfigError(f"{path}.{i}.path must be a path, a glob or a list of them")
        out.append(source)
    return out


def build_model(section: dict | None, path: str = "model") -> ModelConfig:
    """ModelConfig from `{preset: NAME, **overrides}` or full fields; training dtype defaults applied."""
    from jaxllm.models import get_preset

    section = dict(section or {})
    for key in section:
        if key not in _MODEL_KEYS:
            raise unknown_key(f"{path}.{key}", _MODEL_KEYS)
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    for key, value in list(section.items()):
        if key != "preset":
            section[key] = coerce_field(value, fields[key].type, f"{path}.{key}")
    preset = section.pop("preset", None)
    overrides = {**TRAIN_MODEL_DEFAULTS, **section}
    if preset is not None:
        return get_preset(str(preset), **overrides)
    return ModelConfig.from_dict(overrides)


def from_dict(data: dict) -> RunConfig:
    """RunConfig from a nested dict (a parsed recipe); checks every key and type."""
    data = copy.deepcopy(data or {})
    if not isinstance(data, dict):
        raise ConfigError(f"a run config must be a mapping, got {type(data).__name__}")
    top = {f.name: f for f in dataclasses.fields(RunConfig)}
    kwargs = {}
    for key, value in data.items():
        if key not in top:
            raise unknown_key(str(key), list(top))
        if key == "model":
            kwargs[key] = build_model(value)
        elif key == "lora" and value is None:
            kwargs[key] = None
        elif key in _SECTIONS:
            kwargs[key] = build_section(_SECTIONS[key], value or {}, key)
        else:
            kwargs[key] = coerce_field(value, top[key].type, key)
    config = RunConfig(**kwargs)
    # Pin the schedule length, so a longer rerun is a visible change (with train.epochs: once the stage's
    # row count is known, `resolve_epochs`).
    if config.optimizer.decay_steps is None and config.train.epochs is None:
        config.optimizer.decay_steps = config.train.steps
    return config.validate()


def resolve_epochs(config: RunConfig, rows: int | None) -> None:
    """With train.epochs, set train.steps to cover that many passes over `rows` training rows (and the
    schedule's decay_steps to match unless it was given)."""
    t = config.train
    if t.epochs is None:
        return
    if not rows:
        raise ConfigError("train.epochs needs a stage that knows its rows (sft, dpo, rm); pretraining streams "
                          "its data: set train.steps, or data.num_epochs to stop when the data ends")
    t.steps = max(1, math.ceil(t.epochs * rows / t.batch_size))
    if config.optimizer.decay_steps is None:
        config.optimizer.decay_steps = t.steps
    config.validate()


# The recipes ship inside the package (the repository's top-level configs/ links here), so a plain
# `pip install` finds them too.
CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"


def find_recipe(name: str | Path) -> Path:
    """A YAML path, or the name of a shipped recipe (`demo`, `llama2-7b-pretrain`, with or without .yaml)."""
    path = Path(name)
    if path.is_file():
        return path
    if str(name) == path.name:  # a bare name, not a path
        for candidate in (CONFIGS_DIR / path.name, CONFIGS_DIR / f"{path.name}.yaml"):
            if candidate.is_file():
                return candidate
    known = sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml"))
    raise ConfigError(f"recipe '{name}' is neither a file nor a shipped recipe" + closest(str(name), known)
                      + (f"; recipes: {', '.join(known)}" if known else ""))


def recipe_and_overrides(words, error, **options) -> tuple[str | None, list[str]]:
    """(recipe or None, overrides) from a command line's positional words (one recipe at most, then
    `key=value` overrides) and its options (`run_dir="D"` → run_dir=D; None or empty ones skipped).
    `error(message)` reports a misuse (argparse's `parser.error`)."""
    recipes = [word for word in words if "=" not in word]
    if len(recipes) > 1:
        error(f"one recipe at most, got {recipes} (overrides are key=value)")
    overrides = [word for word in words if "=" in word]
    overrides += [f"{key}={value}" for key, value in options.items() if value is not None and value != ""]
    return (recipes[0] if recipes else None), overrides


def load_config(path: str | Path | None = None, overrides: list[str] = (), base: dict | None = None) -> RunConfig:
    """RunConfig from a YAML file or shipped recipe name (or a `base` dict) plus `key=value` overrides."""
    data = read_yaml(find_recipe(path)) if path is not None else dict(base or {})
    return from_dict(apply_overrides(data, list(overrides)))


# ---------------------------------------------------------------------------------------------------------
# Comparing a run's saved config with a new one.

# Keys that may change between the segments of one run: cadence, display, parallel layout, run length.
RESUMABLE_KEYS = ("run_dir", "init_from", "distributed", "train.steps", "train.epochs", "train.max_nan_streak",
                  "train.final_eval", "train.final_eval.", "train.profile", "mesh.", "checkpoint.", "log.", "data.prefetch")


def config_differences(saved: dict, new: dict, resumable=RESUMABLE_KEYS) -> list[str]:
    """'key: old → new' for every difference that makes `new` a different run than `saved` (keys in
    `resumable`, or under a prefix ending with '.', may differ)."""
    a, b = flatten(saved), flatten(new)
    out = []
    for key in sorted(set(a) | set(b)):
        if any(key == k or (k.endswith(".") and key.startswith(k)) for k in resumable):
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            out.append(f"{key}: {a.get(key, '<absent>')!r} → {b.get(key, '<absent>')!r}")
    return out
