"""Data configuration: sources (files or globs, with mixture weights), tokenizer, packing, shuffling."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from jaxllm.config import ConfigError, check_choice, closest
from jaxllm.data.files import FORMATS, TEXT_SPLITS
from jaxllm.data.sources import ERROR_POLICIES


@dataclass
class SourceConfig:
    """One source of documents. `path`: a file, a glob, or a list of them; `weight`: its share of the
    training tokens in a mixture (normalised over sources, e.g. zh 8 : en 3 : code 1 as in CT-LLM);
    `holdout`: its last N records (the end of its last file, paths in sorted order) are never trained on,
    a fixed held-out slice (`train.final_eval`, `jaxllm.data.heldout_texts`)."""
    path: str | list = ""
    weight: float = 1.0
    name: str | None = None
    format: str = "auto"
    text_field: str = "text"
    text_split: str = "blank_line"
    holdout: int = 0


@dataclass
class DataConfig:
    sources: list = field(default_factory=list)   # list[SourceConfig]
    tokenizer: str | None = None                  # sentencepiece model; `assets:NAME` for shipped files
    seq_len: int = 4096
    add_bos: bool = True
    add_eos: bool = True
    shuffle: bool = True
    shuffle_window: int = 10_000                   # documents shuffled together per block
    on_error: str = "skip"                         # malformed records: "skip" (counted) or "raise" (file:line)
    num_epochs: int | None = None                  # None: repeat every source forever
    prefetch: int = 2                              # batches prepared ahead in a thread (0: none)

    def __post_init__(self):
        self.sources = [s if isinstance(s, SourceConfig) else source_from_dict(s, i)
                        for i, s in enumerate(self.sources)]

    def validate(self) -> None:
        if not self.sources:
            raise ConfigError("data.sources is empty: give at least one {path: FILE_OR_GLOB}")
        names = [s.name for s in self.resolved_sources()]
        if len(set(names)) != len(names):
            raise ConfigError(f"data.sources: names must be unique, got {names}")
        for i, s in enumerate(self.sources):
            where = f"data.sources.{i}"
            if not s.path:
                raise ConfigError(f"{where}.path is empty")
            if not (isinstance(s.weight, (int, float)) and s.weight > 0):
                raise ConfigError(f"{where}.weight must be > 0, got {s.weight!r}")
            check_choice(f"{where}.format", s.format, FORMATS)
            check_choice(f"{where}.text_split", s.text_split, TEXT_SPLITS)
            if not (isinstance(s.holdout, int) and s.holdout >= 0):
                raise ConfigError(f"{where}.holdout must be an integer >= 0, got {s.holdout!r}")
        check_choice("data.on_error", self.on_error, ERROR_POLICIES)
        if self.seq_len < 1:
            raise ConfigError(f"data.seq_len must be >= 1, got {self.seq_len}")
        if self.shuffle_window < 1:
            raise ConfigError(f"data.shuffle_window must be >= 1, got {self.shuffle_window}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ConfigError(f"data.num_epochs must be >= 1 or null, got {self.num_epochs}")
        if self.prefetch < 0:
            raise ConfigError(f"data.prefetch must be >= 0, got {self.prefetch}")

    def resolved_sources(self) -> list[SourceConfig]:
        """Sources with a name (default: `source<i>`)."""
        return [dataclasses.replace(s, name=s.name or f"source{i}") for i, s in enumerate(self.sources)]


def source_from_dict(data, index: int) -> SourceConfig:
    if isinstance(data, str):
        return SourceConfig(path=data)
    if not isinstance(data, dict):
        raise ConfigError(f"data.sources.{index} must be a mapping like {{path: FILE}}, got {data!r}")
    names = [f.name for f in dataclasses.fields(SourceConfig)]
    for key in data:
        if key not in names:
            raise ConfigError(f"unknown config key 'data.sources.{index}.{key}'" + closest(key, names))
    return SourceConfig(**data)
