"""Model configuration: one dataclass describes every family; a preset is data.

Validation happens at construction, with one message naming the field at fault.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

POSITIONS = ("rope", "alibi")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "save_qkv_out")
HEADS = ("lm", "none")
ATTENTION_IMPLS = ("auto", "reference", "xla", "cudnn", "splash")
DTYPES = ("float32", "bfloat16", "float16")
FAMILIES = ("llama", "baichuan", "baichuan2", "ctllm", "ziya")
# LoRA targets, by jaxllm name; "qkv" is one adapter whose A is shared by q, k and v (PEFT's on Baichuan's W_pack).
LORA_TARGETS = ("q", "k", "v", "qkv", "o", "gate", "up", "down")
# What users may also write: PEFT / HF module names and groups.
LORA_ALIASES = {"q_proj": ("q",), "k_proj": ("k",), "v_proj": ("v",), "o_proj": ("o",), "gate_proj": ("gate",),
                "up_proj": ("up",), "down_proj": ("down",), "W_pack": ("qkv",), "attention": ("q", "k", "v", "o"),
                "mlp": ("gate", "up", "down"), "all": ("q", "k", "v", "o", "gate", "up", "down")}


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def closest(name: str, options) -> str:
    match = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean '{match[0]}'?)" if match else ""


def check_choice(key: str, value, options) -> None:
    """ConfigError naming `key` unless `value` is one of `options` (suggesting the closest)."""
    if value not in options:
        raise ConfigError(f"{key} must be one of {tuple(options)}, got {value!r}" + closest(str(value), options))


def lora_targets(names, key: str = "lora.targets") -> tuple[str, ...]:
    """Canonical target names from jaxllm names, PEFT module names (q_proj, W_pack, ...) or groups (attention,
    mlp, all), in LORA_TARGETS order; a comma-separated string works too."""
    if isinstance(names, str):
        names = [n for n in names.replace(" ", "").split(",") if n]
    chosen = set()
    for name in names:
        if name not in LORA_TARGETS and name not in LORA_ALIASES:
            options = LORA_TARGETS + tuple(LORA_ALIASES)
            raise ConfigError(f"{key}: unknown target {name!r}" + closest(str(name), options)
                              + f"; known: {', '.join(options)}")
        chosen.update(LORA_ALIASES.get(name, (name,)))
    if "qkv" in chosen and chosen & {"q", "k", "v"}:
        raise ConfigError(f"{key}: qkv (W_pack: one A shared by q, k and v) replaces q, k and v; give one or the "
                          f"other, got {sorted(chosen)}")
    return tuple(t for t in LORA_TARGETS if t in chosen)


@dataclass(frozen=True)
class LoraSpec:
    """Low-rank adapters on the decoder's projections, PEFT's LoRA: y = x·W + scale·dropout(x)·A·B,
    A [in, rank], B [rank, out] (`jaxllm.lora.model` lays them out), scale = alpha/rank (rsLoRA:
    alpha/sqrt(rank)).

    Per-layer ranks and alphas (PEFT's rank_pattern / alpha_pattern, layers_to_transform): `layer_ranks` and
    `layer_alphas` give, per target, one value per layer; the stacked A and B are `rank` (the largest) wide,
    a layer of rank r < rank holding exact zeros past r (rank 0: no adapter in that layer). A target missing
    from a table has `rank` / `alpha` in every layer."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
    rslora: bool = False
    layer_ranks: tuple[tuple[str, tuple[int, ...]], ...] = ()
    layer_alphas: tuple[tuple[str, tuple[float, ...]], ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "targets", lora_targets(self.targets))
        for name in ("layer_ranks", "layer_alphas"):  # model.json gives lists
            table = self.layer_ranks if name == "layer_ranks" else self.layer_alphas
            table = table.items() if isinstance(table, Mapping) else table
            object.__setattr__(self, name, tuple((str(t), tuple(v)) for t, v in table))
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ConfigError(f"lora.rank must be a positive integer, got {self.rank!r}")
        if not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ConfigError(f"lora.alpha must be > 0, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        if not self.targets:
            raise ConfigError("lora.targets is empty: name the projections to adapt (e.g. all, or q_proj, v_proj)")
        for target, ranks in self.layer_ranks:
            if target not in self.targets or any(not 0 <= r <= self.rank for r in ranks):
                raise ConfigError(f"lora.layer_ranks[{target}]: {list(ranks)} (targets {list(self.targets)}, "
                                  f"ranks 0..{self.rank})")

    def _scale(self, alpha: float, rank: int) -> float:
        return 0.0 if rank == 0 else alpha / (math.sqrt(rank) if self.rslora else rank)

    @property
    def scale(self) -> float:
        return self._scale(self.alpha, self.rank)

    def ranks(self, target: str, num_layers: int) -> tuple[int, ...]:
        return dict(self.layer_ranks).get(target, (self.rank,) * num_layers)

    def alphas(self, target: str, num_layers: int) -> tuple[float, ...]:
        return dict(self.layer_alphas).get(target, (self.alpha,) * num_layers)

    def layer_scales(self, target: str, num_layers: int) -> tuple[float, ...] | None:
        """The scale of each layer's adapter of `target`, or None when every layer has `scale`."""
        if target not in dict(self.layer_ranks) and target not in dict(self.layer_alphas):
            return None
        return tuple(self._scale(a, r) for a, r in zip(self.alphas(target, num_layers), self.ranks(target, num_layers)))


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the one decoder.

    `vocab_size` is the number of embedding rows (padded); `tokenizer_vocab_size` the number of
    pieces the tokenizer can emit (Ziya 39,410 of 39,424 rows; CT-LLM 125,696 of 125,824).
    """

    name: str = "custom"
    family: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int | None = None
    max_position_embeddings: int = 4096
    position: str = "rope"
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    norm_head: bool = False
    tie_embeddings: bool = False
    z_loss_weight: float = 0.0
    tokenizer_vocab_size: int | None = None
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = 0
    initializer_range: float = 0.02
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    attention: str = "auto"
    # tokens per chunk of the output layer + loss in training (each chunk's logits recomputed in the backward
    # pass instead of all [batch, len, vocab] float32 logits kept); 0: the whole sequence at once
    loss_chunk: int = 0
    # "none": the backbone alone returns hidden states (reward and value models add their own heads).
    head: str = "lm"
    # LoRA adapters next to the base weights (their leaves are in the parameter tree); None: the base alone.
    lora: LoraSpec | None = None

    def __post_init__(self):
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if isinstance(self.lora, Mapping):  # from model.json
            object.__setattr__(self, "lora", LoraSpec(**self.lora))
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_pieces(self) -> int:
        """Token ids the tokenizer can produce (<= vocab_size)."""
        return self.tokenizer_vocab_size or self.vocab_size

    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"model.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"model.num_heads={self.num_heads} does not divide "
                              f"model.hidden_size={self.hidden_size}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"model.num_kv_heads={self.num_kv_heads} does not divide "
                              f"model.num_heads={self.num_heads}")
        check_choice("model.position", self.position, POSITIONS)
        if self.position == "rope" and self.head_dim % 2:
            raise ConfigError(f"model.hidden_size/num_heads={self.head_dim} must be even for RoPE")
        check_choice("model.family", self.family, FAMILIES)
        check_choice("model.remat", self.remat, REMAT_POLICIES)
        if self.loss_chunk < 0:
            raise ConfigError(f"model.loss_chunk={self.loss_chunk}: expected tokens per chunk (> 0) or 0 (no chunks)")
        check_choice("model.attention", self.attention, ATTENTION_IMPLS)
        check_choice("model.head", self.head, HEADS)
        for name in ("dtype", "param_dtype"):
            check_choice(f"model.{name}", getattr(self, name), DTYPES)
        if self.tokenizer_vocab_size is not None and not (0 < self.tokenizer_vocab_size <= self.vocab_size):
            raise ConfigError(f"model.tokenizer_vocab_size={self.tokenizer_vocab_size} must be in "
                              f"(0, vocab_size={self.vocab_size}]")
        if self.rms_norm_eps <= 0:
            raise ConfigError(f"model.rms_norm_eps must be > 0, got {self.rms_norm_eps}")

    def replace(self, **changes: Any) -> "ModelConfig":
        unknown = [k for k in changes if k not in {f.name for f in dataclasses.fields(self)}]
        if unknown:
            raise ConfigError(f"unknown model field '{unknown[0]}'"
                              + closest(unknown[0], [f.name for f in dataclasses.fields(self)]))
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelConfig":
        names = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in names:
                raise ConfigError(f"unknown model field '{key}'" + closest(key, names))
        return cls(**dict(data))


# ---------------------------------------------------------------------------------------------------------
# Recipes: YAML files, `key=value` overrides, values checked against their dataclass field types.

def _suggest(key: str, prefix: str, options) -> str:
    match = difflib.get_close_matches(key, list(options), n=1)
    return f" (did you mean '{prefix}{match[0]}'?)" if match else ""


def unknown_key(path: str, options) -> ConfigError:
    prefix, _, key = path.rpartition(".")
    prefix = prefix + "." if prefix else ""
    return ConfigError(f"unknown config key '{path}'" + _suggest(key, prefix, options)
                       + f"; known keys under {prefix.rstrip('.') or 'the top level'}: {', '.join(options)}")


def _type_names(annotation) -> set[str]:
    """{'int', 'float', 'None', ...} from a dataclass field annotation (a string under PEP 563)."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    return {part.strip() for part in text.split("|")}


def coerce_field(value, annotation, path: str):
    """Check (and where unambiguous convert) one leaf value against its field type."""
    kinds = _type_names(annotation)
    if value is None:
        if "None" in kinds:
            return None
        raise ConfigError(f"{path} must not be null")
    if isinstance(value, bool):
        if "bool" in kinds:
            return value
    elif isinstance(value, int) and ("int" in kinds or "float" in kinds):
        return value if "int" in kinds else float(value)
    elif isinstance(value, float) and "float" in kinds:
        return value
    elif isinstance(value, str):
        if "str" in kinds:
            return value
        text = value.strip().lower()
        if text in ("null", "none", "~") and "None" in kinds:
            return None
        if "int" in kinds:
            try:
                return int(value)
            except ValueError:
                pass
        if "float" in kinds:  # YAML 1.1 reads "3e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        if "bool" in kinds and text in ("true", "false", "yes", "no"):
            return text in ("true", "yes")
    elif isinstance(value, list) and "list" in kinds:
        return value
    elif isinstance(value, dict) and "dict" in kinds:
        return value
    expected = " or ".join(sorted(k for k in kinds if k != "None")) + (" or null" if "None" in kinds else "")
    raise ConfigError(f"{path} must be {expected}, got {value!r}")


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=VALUE` → (['a', 'b', 'c'], YAML-parsed VALUE)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{item}' is not of the form key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set dotted keys in a nested recipe dict (lists indexed by number: data.sources.0.weight=2).

    Unknown keys are left for `from_dict` to reject, so every mistake gets the same message."""
    data = copy.deepcopy(data)
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for depth, key in enumerate(keys[:-1]):
            where = ".".join(keys[: depth + 1])
            if isinstance(node, list):
                if not key.isdigit() or int(key) >= len(node):
                    raise ConfigError(f"override '{item}': {where} is not an index of a list of {len(node)}")
                if isinstance(node[int(key)], str):  # a source given as a bare path
                    node[int(key)] = {"path": node[int(key)]}
                node = node[int(key)]
                continue
            if key == "sources" and depth == 1 and keys[0] == "data" and key not in node:
                node[key] = []
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, (dict, list)):
                raise ConfigError(f"override '{item}': {where} is a value, not a section")
            node = child
        last = keys[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise ConfigError(f"override '{item}': {last} is not an index of a list of {len(node)}")
            node[int(last)] = value
        else:
            node[last] = value
    return data


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a run config must be a mapping of sections")
    return data


def flatten(data, prefix: str = "") -> dict[str, Any]:
    out = {}
    if isinstance(data, dict):
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
    elif isinstance(data, list) and data and all(isinstance(v, dict) for v in data):
        for i, value in enumerate(data):
            out.update(flatten(value, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = data
    return out
