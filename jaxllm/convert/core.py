"""Streaming conversion HF/Meta ⇄ jaxllm, driven by the table in `mapping.py`.

Import hands orbax `StreamedArray` leaves: each layer slice is read from the source, rearranged and
written into its own storage chunk when orbax asks for it, one slice at a time. Export reads the stored
chunks back one layer at a time and writes HF safetensors shards whose layout is planned from the table
before any data is read. Peak memory is a few times the largest single tensor, not a stacked leaf.
Everything is checked (names, shapes, dtypes) before anything is written, and destinations appear
complete or not at all.
"""
from __future__ import annotations

import functools
import json
import math
import os
import struct
from pathlib import Path
from typing import Callable

import ml_dtypes
import numpy as np

from jaxllm.config import ModelConfig
from jaxllm import storage
from jaxllm.storage import staging_dir
from jaxllm.convert.hf_config import hf_config_from_model, model_config_from_hf, model_config_from_meta
from jaxllm.checkpoint.companions import (COMPANION_FILES, REMOTE_DIR, TOKENIZER_CONFIG, carry_remote_code, carry_tokenizer, find_remote_code,
                                    hub_auto_map, persistent_inv_freq, read_auto_map, tokenizer_config)
from jaxllm.convert.mapping import TensorMap, get_path, set_path, is_ignored, layout_of, native_layout, tensor_maps
from jaxllm.convert.readers import DTYPE_NAMES, ConversionError, MetaReader, open_hf, open_source, read_json

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
TOKENIZER_FILES = ("tokenizer.model",) + COMPANION_FILES
HF_ARCHS = ("native", "llama")


def plan_shards(entries, max_shard_bytes: int) -> list[list[tuple[str, tuple, np.dtype]]]:
    """Group (key, shape, dtype) entries, in order, into shards of at most `max_shard_bytes`."""
    plan, current, size = [], [], 0
    for key, shape, dtype in entries:
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        if current and size + nbytes > max_shard_bytes:
            plan.append(current)
            current, size = [], 0
        current.append((key, tuple(shape), np.dtype(dtype)))
        size += nbytes
    plan.append(current)
    return plan


def check_destination(dst: Path) -> None:
    storage.check_bucket(dst)
    if storage.exists(dst):
        raise ConversionError(f"{dst}: destination exists; remove it or choose another path")
    storage.makedirs(dst.parent)


def _leaf_groups(maps: list[TensorMap]) -> list[list[TensorMap]]:
    """Tensors grouped by the jaxllm leaves they touch, in leaf order (one stacked leaf per group)."""
    groups: dict[tuple, list[TensorMap]] = {}
    for m in maps:
        groups.setdefault(m.leaves, []).append(m)
    return list(groups.values())


def validate_source(reader, maps: list[TensorMap], where: str, *, cast: bool = False) -> None:
    """Every tensor of the layout present with its shape and a float dtype, nothing else (one clear error).
    `cast`: the dtype is converted anyway (--dtype), so any float dtype will do."""
    expected = {m.hf_key: m.hf_shape for m in maps}
    present = set(reader.keys())
    missing = [k for k in expected if k not in present]
    if missing:
        raise ConversionError(f"{where}: missing tensor {missing[0]}" +
                              (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    unexpected = sorted(k for k in present if k not in expected and not is_ignored(k))
    if unexpected:
        raise ConversionError(f"{where}: unexpected tensor {unexpected[0]} — does the config match the weights?")
    if not hasattr(reader, "shape"):
        return
    floats = {np.dtype(v) for v in DTYPES.values()} | ({np.dtype(np.float64)} if cast else set())
    for m in maps:
        shape = tuple(reader.shape(m.hf_key))
        if shape != m.hf_shape:
            raise ConversionError(f"{where}: tensor {m.hf_key} has shape {shape}, expected {m.hf_shape} "
                                  f"— does the config match the weights?")
        dtype = reader.dtype(m.hf_key)
        if dtype not in floats:
            raise ConversionError(f"{where}: tensor {m.hf_key} has dtype {dtype}, expected one of "
                                  f"float32, bfloat16, float16" + ("" if cast else " (or pass --dtype)"))


def _leaf_blocks(reader, group: list[TensorMap], j: int, dtype: np.dtype):
    """(index, block) of leaf j of `group`: one layer slice per HF tensor, produced on demand."""
    for m in group:
        # no local name for the block: a suspended generator would keep it alive until its next turn
        yield ((slice(None) if m.layer is None else m.layer),
               m.leaf(reader.get(m.hf_key), j).astype(dtype, copy=False))


def source_tokenizer(src: Path, meta: bool, tokenizer: str | os.PathLike | None) -> tuple[Path | None, str]:
    """The tokenizer.model that goes with `src`, and a line saying which file and why: `tokenizer` when
    given; else the one beside the weights; for Meta's release, the one in the parent folder (Meta keeps
    `tokenizer.model` beside, not inside, `llama-2-7b/`)."""
    if tokenizer is not None:
        path = storage.path(tokenizer)
        if path.is_dir():
            path = path / "tokenizer.model"
        if not path.is_file():
            raise ConversionError(f"--tokenizer {tokenizer}: no such tokenizer file")
        return path, f"tokenizer: {path} (--tokenizer)"
    if (src / "tokenizer.model").is_file():
        return src / "tokenizer.model", f"tokenizer: {src / 'tokenizer.model'} (beside the weights)"
    if meta and (src.parent / "tokenizer.model").is_file():
        return src.parent / "tokenizer.model", (f"tokenizer: {src.parent / 'tokenizer.model'} (the parent folder, "
                                                f"where Meta's release keeps it)")
    return None, (f"tokenizer: none beside the weights{' or in the parent folder' if meta else ''}; "
                  f"generate and chat will need --tokenizer (or convert again with --tokenizer)")


def hf_to_jaxllm(src: str | os.PathLike, dst: str | os.PathLike, *, family: str | None = None,
                 dtype: str | None = None, tokenizer: str | os.PathLike | None = None,
                 log: Callable[[str], None] | None = None) -> ModelConfig:
    """Convert an HF (safetensors / .bin) or Meta (.pth) directory into a jaxllm checkpoint at `dst`, with
    its tokenizer (and that tokenizer's HF files) and the HF remote code it ships. `log` receives one line
    per decision the files leave open (position encoding, which tokenizer, what code is carried)."""
    from jaxllm.checkpoint import StreamedArray, save_params
    from jaxllm.models import param_shapes
    from jaxllm.tokenizer import Tokenizer, TokenizerError

    log = log or (lambda line: None)
    storage.check_bucket(src)
    src, dst = storage.path(src), storage.path(dst)
    check_destination(dst)
    reader = open_source(src)
    meta = isinstance(reader, MetaReader)
    notes: list[str] = []
    if meta:
        config = model_config_from_meta(src, reader.shape("model.embed_tokens.weight")[0], family)
    else:
        config = model_config_from_hf(src, family, name=src.name, notes=notes)
    maps = tensor_maps(config, layout_of(reader.keys()))
    validate_source(reader, maps, str(src), cast=dtype is not None)
    tok_path, tok_note = source_tokenizer(src, meta, tokenizer)
    notes.append(tok_note)
    if tok_path is not None:  # a tokenizer that does not load, or fit the model, fails before anything is written
        try:
            tok = Tokenizer.load(tok_path, family=config.family)
        except TokenizerError as err:
            raise ConversionError(str(err)) from None
        check_tokenizer_fits(tok, config, str(src))
    names = {np.dtype(v): k for k, v in DTYPES.items()}
    # stored as in the source (each leaf as its tensors), unless --dtype says otherwise
    config = config.replace(param_dtype=dtype or names[reader.dtype("model.embed_tokens.weight")])
    shapes = param_shapes(config)
    params: dict = {}
    for group in _leaf_groups(maps):
        leaf_dtype = np.dtype(DTYPES[dtype]) if dtype else reader.dtype(group[0].hf_key)
        for j, path in enumerate(group[0].leaves):
            set_path(params, path, StreamedArray(get_path(shapes, path).shape, leaf_dtype,
                                             functools.partial(_leaf_blocks, reader, group, j, leaf_dtype)))
    staging = staging_dir(dst)
    try:
        out = staging / "checkpoint"
        save_params(out, params, config)
        if tok_path is not None:
            carry_tokenizer(tok_path, out)
        if not meta:
            kept = carry_remote_code(src, read_json(src / "config.json"), out)
            if kept:
                notes.append(f"remote code: {', '.join(kept)} kept in {dst / REMOTE_DIR}")
        storage.rename(out, dst)
    finally:
        storage.rmtree(staging, ignore_errors=True)
    for line in notes:
        log(line)
    return config


def check_tokenizer_fits(tok, config: ModelConfig, where: str) -> None:
    """Every id the tokenizer can produce needs an embedding row (added tokens sit past the pieces)."""
    if tok.vocab_size > config.vocab_size:
        last = max(tok.added_by_id, default=tok.vocab_size - 1)
        what = f" (added token {tok.added_by_id[last].content!r} = {last})" if last in tok.added_by_id else ""
        raise ConversionError(f"{tok.path}: the tokenizer has ids up to {tok.vocab_size - 1}{what}, but the model "
                              f"in {where} has {config.vocab_size} embedding rows")


class _ShardWriter:
    """Writes planned safetensors shards sequentially; tensors must arrive in plan order."""

    def __init__(self, directory: Path, plan: list[list[tuple[str, tuple, np.dtype]]]):
        self.directory, self.plan = directory, plan
        self.names = [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))]
        self.order = [(s, k) for s, shard in enumerate(plan) for k, _, _ in shard]
        self.cursor, self.file, self.expected = 0, None, None

    def write(self, key: str, array: np.ndarray) -> None:
        shard, expected_key = self.order[self.cursor]
        assert key == expected_key, (key, expected_key)
        if self.file is None or self.current != shard:
            self._open(shard)
        # the array's own buffer (bytes view), not a `tobytes()` copy
        self.file.write(memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8)))
        self.cursor += 1
        if self.cursor == len(self.order) or self.order[self.cursor][0] != shard:
            self.file.close()
            self.file = None

    def _open(self, shard: int) -> None:
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for key, shape, dtype in self.plan[shard]:
            size = int(np.prod(shape)) * np.dtype(dtype).itemsize
            header[key] = {"dtype": DTYPE_NAMES[np.dtype(dtype)], "shape": list(shape),
                           "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.file = storage.open(self.directory / self.names[shard], "wb")
        self.file.write(struct.pack("<Q", len(raw)) + raw)
        self.current = shard

    def index(self) -> dict:
        total = sum(int(np.prod(s)) * np.dtype(d).itemsize for shard in self.plan for _, s, d in shard)
        weight_map = {k: self.names[s] for s, shard in enumerate(self.plan) for k, _, _ in shard}
        return {"metadata": {"total_size": total}, "weight_map": weight_map}


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """RoPE's inverse frequencies float32[head_dim / 2] (the modeling code's float32 buffer), correctly
    rounded from float64."""
    d = config.head_dim
    return (1.0 / config.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d)).astype(np.float32)


def jaxllm_to_hf(src: str | os.PathLike, dst: str | os.PathLike, *, dtype: str | None = None,
                 max_shard_bytes: int = 5 * 2**30, hf_arch: str = "native",
                 log: Callable[[str], None] | None = None, arrays: dict | None = None) -> ModelConfig:
    """Export a jaxllm checkpoint as an HF directory (config, generation config, sharded safetensors, the
    tokenizer and its HF files, the remote code it carries).

    hf_arch "native": the family's own layout; a Baichuan model gets its carried modeling code and
    `auto_map` (or an `auto_map` naming baichuan-inc's code on the Hub when it carries none) and, where
    that code keeps RoPE's `inv_freq` as a persistent buffer (Baichuan-7B), the buffers it expects.
    hf_arch "llama": a RoPE Baichuan model as a stock `LlamaForCausalLM` (W_pack split into q/k/v,
    NormHead rows normalised in float32 and stored in the export dtype); no remote code needed.
    `arrays`: leaves to export instead of the stored ones, read the same way (a LoRA merge)."""
    from jaxllm.checkpoint import find_tokenizer, open_arrays, read_model_config, resolve, trim_host_memory
    from jaxllm.models import param_shapes
    from jaxllm.tokenizer import Tokenizer, TokenizerError

    log = log or (lambda line: None)
    if hf_arch not in HF_ARCHS:
        raise ConversionError(f"--hf-arch must be one of {', '.join(HF_ARCHS)}, got {hf_arch!r}")
    ckpt = resolve(src)
    dst = storage.path(dst)
    check_destination(dst)
    config = read_model_config(ckpt)
    if hf_arch == "llama" and config.position != "rope":
        raise ConversionError(f"{ckpt}: --hf-arch llama needs a RoPE model; {config.family} with ALiBi "
                              f"({config.name}) has no LlamaForCausalLM equivalent")
    layout = "llama" if hf_arch == "llama" else native_layout(config)
    maps = tensor_maps(config, layout)
    groups = _leaf_groups(maps)
    shapes = param_shapes(config)
    if arrays is None:
        arrays = open_arrays(ckpt, [path for group in groups for path in group[0].leaves])
    for path, array in arrays.items():
        if array.shape != get_path(shapes, path).shape:
            raise ConversionError(f"{ckpt}: leaf {'/'.join(path)} has shape {array.shape}, expected "
                                  f"{get_path(shapes, path).shape} for the model in {ckpt / 'model.json'}")
    code = find_remote_code(ckpt)
    auto_map = None
    if layout == "baichuan":
        auto_map = read_auto_map(code)
        if auto_map is None:
            auto_map = hub_auto_map(config)
            log(f"remote code: none carried; auto_map names {auto_map['AutoModelForCausalLM'].split('--')[0]}'s "
                f"code on the Hub (downloaded by trust_remote_code=True), or export with --hf-arch llama")
        else:
            log(f"remote code: {', '.join(sorted(p.name for p in code.glob('*.py')))} and auto_map from {code}")
    buffers = []
    if layout == "baichuan" and persistent_inv_freq(config, code, auto_map):
        buffers = [(f"model.layers.{i}.self_attn.rotary_emb.inv_freq", rope_inv_freq(config))
                   for i in range(config.num_layers)]
    tok_path = find_tokenizer(ckpt)
    try:
        tok = Tokenizer.load(tok_path, family=config.family) if tok_path is not None else None
    except TokenizerError as err:
        raise ConversionError(str(err)) from None
    if tok is not None:
        check_tokenizer_fits(tok, config, str(ckpt))
    out_dtype = np.dtype(DTYPES[dtype or config.param_dtype])
    plan = plan_shards([(m.hf_key, m.hf_shape, out_dtype) for group in groups for m in group] +
                       [(key, value.shape, value.dtype) for key, value in buffers], max_shard_bytes)
    staging = staging_dir(dst)
    try:
        writer = _ShardWriter(staging, plan)
        for group in groups:  # leaf by leaf; within a leaf, one layer at a time
            for m in group:
                parts = [arrays[p].read() if m.layer is None else arrays[p].layer(m.layer) for p in m.leaves]
                writer.write(m.hf_key, m.to_hf(parts).astype(out_dtype, copy=False))
                del parts
                trim_host_memory()
            for p in group[0].leaves:
                arrays[p].release()
        for key, value in buffers:  # float32 whatever the export dtype, as the modeling code creates them
            writer.write(key, value)
        (staging / "model.safetensors.index.json").write_text(json.dumps(writer.index(), indent=2))
        hf_cfg, gen_cfg = hf_config_from_model(config, dtype or config.param_dtype, layout=layout)
        if auto_map is not None:
            hf_cfg["auto_map"] = auto_map
        (staging / "config.json").write_text(json.dumps(hf_cfg, indent=2))
        (staging / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2))
        if code is not None:  # the tokenizer's code too; harmless beside a stock Llama config
            for path in sorted(code.glob("*.py")):
                storage.copy(path, staging / path.name)
        if tok is not None:
            carry_tokenizer(tok.path, staging)
            if not (staging / TOKENIZER_CONFIG).is_file():
                (staging / TOKENIZER_CONFIG).write_text(
                    json.dumps(tokenizer_config(config, tok, code), indent=2))
            log(f"tokenizer: {tok.path} (BOS: {'yes' if tok.add_bos else 'no'}, from {tok.add_bos_source})")
        storage.rename(staging, dst)
    finally:
        storage.rmtree(staging, ignore_errors=True)
    return config


# Ziya's delta (spec §8, Fengshenbang apply_delta.py): these are the fine-tuned tensors themselves.
_VERBATIM = ("model.embed_tokens.weight", "lm_head.weight")
_BUFFER = "rotary_emb.inv_freq"


def _verbatim(key: str) -> bool:
    return key in _VERBATIM or key.endswith(_BUFFER)


def apply_delta(base: str | os.PathLike, delta: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Ziya's release format (spec §8): W = W_base + Δ in float16 for every tensor, except the embedding,
    `lm_head` and `rotary_emb.inv_freq`, taken verbatim (values and dtype) from the delta. Writes an HF
    directory; every other tensor must be in both, with the same shape."""
    base_dir, delta_dir, dst = storage.path(base), storage.path(delta), storage.path(dst)
    check_destination(dst)
    base_r, delta_r = open_hf(base_dir), open_hf(delta_dir)
    base_keys, keys = set(base_r.keys()), delta_r.keys()
    # inv_freq is a buffer recomputed from the config: a base converted by newer transformers lacks it
    # while an older delta has it (or the other way round); it is never an added weight.
    only_delta = [k for k in keys if k not in base_keys and not k.endswith(_BUFFER)]
    if only_delta:
        raise ConversionError(f"{delta_dir}: tensor {only_delta[0]} is in the delta but not in the base "
                              f"{base_dir}" + (f" (and {len(only_delta) - 1} more)" if len(only_delta) > 1 else ""))
    only_base = sorted(k for k in base_keys - set(keys) if not k.endswith(_BUFFER))
    if only_base:
        raise ConversionError(f"{base_dir}: tensor {only_base[0]} is in the base but not in the delta "
                              f"{delta_dir}" + (f" (and {len(only_base) - 1} more)" if len(only_base) > 1 else ""))
    for k in keys:
        if not _verbatim(k) and tuple(base_r.shape(k)) != tuple(delta_r.shape(k)):
            raise ConversionError(f"{delta_dir}: tensor {k} has shape {tuple(delta_r.shape(k))}, but "
                                  f"{tuple(base_r.shape(k))} in the base {base_dir}")
    out_dtype = {k: delta_r.dtype(k) if _verbatim(k) else np.dtype(np.float16) for k in keys}
    plan = plan_shards([(k, delta_r.shape(k), out_dtype[k]) for k in keys], 5 * 2**30)
    staging = staging_dir(dst)
    try:
        writer = _ShardWriter(staging, plan)
        for k in keys:
            if _verbatim(k):
                out = delta_r.get(k)
            else:
                out = base_r.get(k).astype(np.float16) + delta_r.get(k).astype(np.float16)
            writer.write(k, out)
            del out
        (staging / "model.safetensors.index.json").write_text(json.dumps(writer.index(), indent=2))
        for name in ("config.json", "generation_config.json") + TOKENIZER_FILES:
            if (delta_dir / name).is_file():
                storage.copy(delta_dir / name, staging / name)
        storage.rename(staging, dst)
    finally:
        storage.rmtree(staging, ignore_errors=True)
