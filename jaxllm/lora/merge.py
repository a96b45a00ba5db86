"""Adapters merged into their base, streamed one layer at a time (W + (alpha/rank)·A·B in float32, stored in
the base's dtype), and the `jaxllm convert` actions on adapters: PEFT export and import, merges."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from jaxllm.lora import files as adapters
from jaxllm.checkpoint import (CheckpointError, StreamedArray, find_tokenizer, open_arrays, read_model_config,
                               resolve, save_params)
from jaxllm.config import ModelConfig
from jaxllm.convert.readers import ConversionError
from jaxllm.lora import model as lora


class MergedArray:
    """A base leaf read like `checkpoint.StoredArray` (whole or a layer at a time), its adapter added; or a
    base weight the adapter trained, taken from the adapter."""

    def __init__(self, stored, path: tuple, leaves: dict, config: ModelConfig):
        self.stored, self.path, self.config = stored, path, config
        self.shape, self.dtype = stored.shape, stored.dtype
        self.trained = leaves.get(path)
        module = path[:-1]
        self.adapters = {p[-1]: v for p, v in leaves.items() if p[:-1] == module and lora.is_adapter_key(p[-1])}

    def layer(self, i: int) -> np.ndarray:
        if self.trained is not None:
            return self.trained[i].astype(self.dtype)
        name = self.path[-1]
        if name not in lora.WEIGHTS:
            return self.stored.layer(i)
        scale = lora.layer_scale(self.config.lora, name, i, self.config.num_layers)
        return lora.merged_layer(name, i, self.stored.layer(i), self.adapters, scale)

    def read(self) -> np.ndarray:
        if self.trained is not None:
            return self.trained.astype(self.dtype)
        if self.path[0] == "layers":
            return np.stack([self.layer(i) for i in range(self.shape[0])])
        return self.stored.read()

    def release(self) -> None:
        self.stored.release()


def merged_arrays(base_dir, config: ModelConfig, leaves: dict) -> dict:
    """{leaf path: MergedArray} over every leaf of the base checkpoint `base_dir` (architecture `config`)."""
    from jaxllm.models import param_shapes

    paths = lora.leaf_paths(param_shapes(config.replace(lora=None)))
    stored = open_arrays(base_dir, paths)
    return {p: MergedArray(stored[p], p, leaves, config) for p in paths}


def _base_of(src, base) -> Path:
    if base:
        return Path(base)
    record = adapters.read_record(src) or {}
    if not record.get("base"):
        raise ConversionError(f"{src}: the base it adapts is not recorded; give it with --base DIR")
    if not Path(record["base"]).exists():
        raise ConversionError(f"{src}: its base {record['base']} is gone; give it with --base DIR")
    return Path(record["base"])


def _base_config(base: Path) -> ModelConfig:
    if (base / "config.json").is_file() and not (resolve(base) / "model.json").is_file():
        raise ConversionError(f"{base}: an HF directory; convert the base first (`jaxllm convert --from hf --to "
                              f"jaxllm {base} DIR`) and pass that as --base")
    return read_model_config(resolve(base))


def load(src, base=None):
    """(adapted config, adapter leaves, record, base dir or None) of a jaxllm adapter or PEFT directory."""
    base_dir = _base_of(src, base) if (base or not adapters.is_peft_dir(src)) else None
    if adapters.is_peft_dir(src) and base_dir is None:
        raise ConversionError(f"{src}: a PEFT adapter; give the jaxllm checkpoint of its base with --base DIR")
    try:
        base_config = _base_config(base_dir) if base_dir is not None else None
        config, leaves, record = adapters.load_adapter(src, base_config)
    except CheckpointError as err:
        raise ConversionError(str(err)) from None
    return config, leaves, record, base_dir


def export_peft(src, dst, base_name: str | None = None) -> ModelConfig:
    """jaxllm adapter (a LoRA run) → PEFT directory; `base_name`: its base_model_name_or_path (the base's HF
    directory or hub name; default: the one recorded, else the recorded base)."""
    from jaxllm.lora.peft import write_peft

    if adapters.is_peft_dir(src):
        raise ConversionError(f"{src}: already a PEFT adapter")
    score = None
    try:
        if (adapters.read_record(src) or {}).get("lm_path"):  # a reward model: PEFT's SEQ_CLS with `score`
            config, leaves, head, record = adapters.load_reward_adapter(src)
            if float(head["bias"]) != 0.0:
                raise ConversionError(f"{src}: the reward head's bias is {float(head['bias'])!r}; "
                                      f"LlamaForSequenceClassification's score has none")
            score = head["kernel"]
        else:
            config, leaves, record = adapters.load_adapter(src)
    except CheckpointError as err:
        raise ConversionError(str(err)) from None
    write_peft(dst, config, leaves, record.get("train", ()), base_name or record.get("base_name") or record.get("base"),
               score=score, dtype=record.get("peft_dtype"))
    return config


def import_adapter(src, dst, base) -> ModelConfig:
    """PEFT directory → jaxllm adapter checkpoint (continue training it with lora.init_adapter, generate
    with --adapter)."""
    from jaxllm.convert.core import check_destination

    if not adapters.is_peft_dir(src):
        raise ConversionError(f"{src}: no adapter_config.json (a PEFT adapter directory is expected)")
    from jaxllm.storage import staging_dir

    config, leaves, record, base_dir = load(src, base)  # every refusal comes before anything is written
    dst = Path(dst)
    check_destination(dst)
    staging = staging_dir(dst)
    try:
        out = staging / "adapter"
        save_params(out, adapters.nest(leaves), config)
        adapters.write_record(out, base=str(base_dir), base_digest=None, train=record["train"],
                              base_name=record.get("base_name"), peft_dtype=record.get("peft_dtype"))
        out.rename(dst)  # whole or absent
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return config


def merge_to_jaxllm(src, dst, base=None) -> ModelConfig:
    """Adapter + its base → a merged jaxllm checkpoint (a plain model: PPO, eval, export all take it)."""
    from jaxllm.convert.core import check_destination
    from jaxllm.storage import staging_dir

    config, leaves, _, base_dir = load(src, base)
    dst = Path(dst)
    check_destination(dst)
    arrays = merged_arrays(base_dir, config, leaves)

    def leaf(path, array):
        if path[0] != "layers":
            return StreamedArray(array.shape, array.dtype, lambda: iter([(slice(None), array.read())]))
        return StreamedArray(array.shape, array.dtype,
                             lambda: ((i, array.layer(i)) for i in range(array.shape[0])))

    staging = staging_dir(dst)
    try:
        out = staging / "checkpoint"
        base_config = _base_config(base_dir)
        save_params(out, adapters.nest({p: leaf(p, a) for p, a in arrays.items()}), base_config)
        tok = find_tokenizer(resolve(base_dir))
        if tok is not None:
            shutil.copyfile(tok, out / "tokenizer.model")
        out.rename(dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return base_config


def merge_to_hf(src, dst, base=None, *, dtype=None, max_shard_bytes: int = 5 * 2**30) -> ModelConfig:
    """Adapter + its base → an HF directory of merged weights."""
    from jaxllm.convert.core import jaxllm_to_hf

    config, leaves, _, base_dir = load(src, base)
    return jaxllm_to_hf(base_dir, dst, dtype=dtype, max_shard_bytes=max_shard_bytes,
                        arrays=merged_arrays(base_dir, config, leaves))


def is_adapter(path: str | os.PathLike) -> bool:
    return adapters.is_peft_dir(path) or adapters.read_record(path) is not None
