"""Streaming conversion HF/Meta ⇄ jaxllm, driven by the table in `mapping.py`.

Import fills one layer-stacked leaf at a time in memory-mapped staging files, then orbax writes them;
export restores one leaf (or the q/k/v group of W_pack) at a time and writes HF safetensors shards whose
layout is planned from the table before any data is read. Destinations appear complete or not at all.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
from pathlib import Path

import ml_dtypes
import numpy as np

from jaxllm.config import ModelConfig
from jaxllm.convert.hf_config import hf_config_from_model, model_config_from_hf, model_config_from_meta
from jaxllm.convert.mapping import TensorMap, _get, _set, is_ignored, tensor_maps
from jaxllm.convert.readers import DTYPE_NAMES, ConversionError, MetaReader, open_hf, open_source

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


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


def _check_destination(dst: Path) -> None:
    if dst.exists():
        raise ConversionError(f"{dst}: destination exists; remove it or choose another path")
    dst.parent.mkdir(parents=True, exist_ok=True)


def _staging(dst: Path) -> Path:
    return Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))


def _leaf_groups(maps: list[TensorMap]) -> list[list[TensorMap]]:
    """Tensors grouped by the jaxllm leaves they touch, in leaf order (one stacked leaf per group)."""
    groups: dict[tuple, list[TensorMap]] = {}
    for m in maps:
        groups.setdefault(m.leaves, []).append(m)
    return list(groups.values())


def validate_source(reader, maps: list[TensorMap], where: str) -> None:
    expected = {m.hf_key: m.hf_shape for m in maps}
    present = set(reader.keys())
    missing = [k for k in expected if k not in present]
    if missing:
        raise ConversionError(f"{where}: missing tensor {missing[0]}" +
                              (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    unexpected = sorted(k for k in present if k not in expected and not is_ignored(k))
    if unexpected:
        raise ConversionError(f"{where}: unexpected tensor {unexpected[0]} — does the config match the weights?")


def hf_to_jaxllm(src: str | os.PathLike, dst: str | os.PathLike, *, family: str | None = None,
                 dtype: str | None = None) -> ModelConfig:
    """Convert an HF (safetensors / .bin) or Meta (.pth) directory into a jaxllm checkpoint at `dst`."""
    from jaxllm.checkpoint import save_params

    src, dst = Path(src), Path(dst)
    _check_destination(dst)
    reader = open_source(src)
    if isinstance(reader, MetaReader):
        rows = reader.get("model.embed_tokens.weight").shape[0]
        config = model_config_from_meta(src, rows, family)
    else:
        config = model_config_from_hf(src, family, name=src.name)
    maps = tensor_maps(config)
    validate_source(reader, maps, str(src))
    staging = _staging(dst)
    try:
        leaves: dict[tuple, np.ndarray] = {}
        from jaxllm.models import param_shapes
        shapes = param_shapes(config)
        for group in _leaf_groups(maps):
            for m in group:
                w = reader.get(m.hf_key)
                if tuple(w.shape) != m.hf_shape:
                    raise ConversionError(f"{src}: tensor {m.hf_key} has shape {tuple(w.shape)}, expected "
                                          f"{m.hf_shape} for {config.num_layers} layers × hidden "
                                          f"{config.hidden_size}")
                target = np.dtype(DTYPES[dtype]) if dtype else w.dtype
                for path, value in zip(m.leaves, m.to_jax(w)):
                    if path not in leaves:
                        shape = _get(shapes, path).shape
                        leaves[path] = np.lib.format.open_memmap(
                            staging / ("__staging_" + "_".join(path) + ".npy"), mode="w+", dtype=target,
                            shape=shape)
                    if m.layer is None:
                        leaves[path][...] = value.astype(target)
                    else:
                        leaves[path][m.layer] = value.astype(target)
            for path in group[0].leaves:
                leaves[path].flush()
        stored = {np.dtype(v): k for k, v in DTYPES.items()}.get(next(iter(leaves.values())).dtype)
        if stored is None:
            raise ConversionError(f"{src}: weights of dtype {next(iter(leaves.values())).dtype} are not "
                                  f"float32/bfloat16/float16; pass --dtype")
        config = config.replace(param_dtype=stored)
        params: dict = {}
        for path, leaf in leaves.items():
            _set(params, path, leaf)
        out = staging / "checkpoint"
        save_params(out, params, config)
        del params, leaves
        for f in staging.glob("__staging_*.npy"):
            f.unlink()
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, out / name)
        out.rename(dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return config


def _restore_leaves(ckpt_dir: Path, paths: list[tuple], config: ModelConfig, step=None) -> dict:
    """Restore only the given leaves (numpy) from a jaxllm checkpoint."""
    import orbax.checkpoint as ocp

    from jaxllm.checkpoint import manager
    from jaxllm.models import param_shapes

    shapes = param_shapes(config)
    item: dict = {}
    restore: dict = {}
    for path in paths:
        _set(item, path, np.zeros((), np.float32))
        _set(restore, path, ocp.RestoreArgs(restore_type=np.ndarray))
    with manager(ckpt_dir) as mngr:
        step = mngr.latest_step() if step is None else step
        out = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.PyTreeRestore(
            item=item, restore_args=restore, partial_restore=True)))["params"]
    result = {p: np.asarray(_get(out, p)) for p in paths}
    for p, v in result.items():
        if v.shape != _get(shapes, p).shape:
            raise ConversionError(f"{ckpt_dir}: leaf {'/'.join(p)} has shape {v.shape}, expected "
                                  f"{_get(shapes, p).shape}")
    return result


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
        self.file.write(np.ascontiguousarray(array).tobytes())
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
        self.file = open(self.directory / self.names[shard], "wb")
        self.file.write(struct.pack("<Q", len(raw)) + raw)
        self.current = shard

    def index(self) -> dict:
        total = sum(int(np.prod(s)) * np.dtype(d).itemsize for shard in self.plan for _, s, d in shard)
        weight_map = {k: self.names[s] for s, shard in enumerate(self.plan) for k, _, _ in shard}
        return {"metadata": {"total_size": total}, "weight_map": weight_map}


def jaxllm_to_hf(src: str | os.PathLike, dst: str | os.PathLike, *, dtype: str | None = None,
                 max_shard_bytes: int = 5 * 2**30) -> ModelConfig:
    """Export a jaxllm checkpoint as an HF directory (config, generation config, sharded safetensors)."""
    from jaxllm.checkpoint import read_model_config, resolve, find_tokenizer

    ckpt = resolve(src)
    dst = Path(dst)
    _check_destination(dst)
    config = read_model_config(ckpt)
    maps = tensor_maps(config)
    groups = _leaf_groups(maps)
    out_dtype = np.dtype(DTYPES[dtype or config.param_dtype])
    plan = plan_shards([(m.hf_key, m.hf_shape, out_dtype) for group in groups for m in group], max_shard_bytes)
    staging = _staging(dst)
    try:
        writer = _ShardWriter(staging, plan)
        for group in groups:
            leaves = _restore_leaves(ckpt, list(group[0].leaves), config)
            for m in group:
                parts = [leaves[p] if m.layer is None else leaves[p][m.layer] for p in m.leaves]
                writer.write(m.hf_key, m.to_hf(parts).astype(out_dtype))
            del leaves
        (staging / "model.safetensors.index.json").write_text(json.dumps(writer.index(), indent=2))
        hf_cfg, gen_cfg = hf_config_from_model(config, dtype or config.param_dtype)
        (staging / "config.json").write_text(json.dumps(hf_cfg, indent=2))
        (staging / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2))
        tok = find_tokenizer(ckpt)
        if tok is not None:
            shutil.copyfile(tok, staging / "tokenizer.model")
            for name in TOKENIZER_FILES[1:]:
                if (tok.parent / name).is_file():
                    shutil.copyfile(tok.parent / name, staging / name)
        staging.rename(dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return config


def apply_delta(base: str | os.PathLike, delta: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Ziya's release format (spec §8): W = W_base + Δ in float16 for every tensor, except the embedding,
    `lm_head` and `rotary_emb.inv_freq`, taken verbatim from the delta. Writes an HF directory."""
    base_dir, delta_dir, dst = Path(base), Path(delta), Path(dst)
    _check_destination(dst)
    base_r, delta_r = open_hf(base_dir), open_hf(delta_dir)
    verbatim = ("model.embed_tokens.weight", "lm_head.weight")
    keys = [k for k in delta_r.keys()]
    for k in keys:
        if k not in verbatim and not k.endswith("rotary_emb.inv_freq") and k not in set(base_r.keys()):
            raise ConversionError(f"{base_dir}: missing tensor {k} that the delta adds to")
    plan = plan_shards([(k, delta_r.get(k).shape, np.float16) for k in keys], 5 * 2**30)
    staging = _staging(dst)
    try:
        writer = _ShardWriter(staging, plan)
        for k in keys:
            d = delta_r.get(k).astype(np.float16)
            if k in verbatim or k.endswith("rotary_emb.inv_freq"):
                out = d
            else:
                b = base_r.get(k).astype(np.float16)
                if b.shape != d.shape:
                    raise ConversionError(f"tensor {k}: base shape {b.shape} differs from delta {d.shape}")
                out = b + d
            writer.write(k, out)
        (staging / "model.safetensors.index.json").write_text(json.dumps(writer.index(), indent=2))
        for name in ("config.json", "generation_config.json") + TOKENIZER_FILES:
            if (delta_dir / name).is_file():
                shutil.copyfile(delta_dir / name, staging / name)
        staging.rename(dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
