"""Tensor readers for HF / PyTorch / Meta checkpoints: one tensor at a time, as numpy.

- safetensors (single or sharded with `model.safetensors.index.json`): the header is parsed here and each
  tensor is a memory-mapped view, so bfloat16 survives bit-exactly and a truncated file is caught.
- `pytorch_model*.bin`: `torch.load(weights_only=True, mmap=True)`; a pickle can never run code.
- Meta `consolidated.*.pth` + `params.json`: model-parallel shards merged and RoPE rows permuted into
  HF's rotate-half layout (spec §2.2–2.3), presented under HF names.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
                      "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
                      "BOOL": np.bool_}
DTYPE_NAMES = {np.dtype(v): k for k, v in SAFETENSORS_DTYPES.items()}


class ConversionError(ValueError):
    """The source cannot be converted; the message names the file or tensor and what was expected."""


class SafetensorsFile:
    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ConversionError(f"{path}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise ConversionError(f"{path}: truncated safetensors file (header of {n} bytes, file {size})")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise ConversionError(f"{path}: not a safetensors file (bad header)") from None
        header.pop("__metadata__", None)
        self.start = 8 + n
        self.header = header
        end = max((v["data_offsets"][1] for v in header.values()), default=0)
        if self.start + end > size:
            raise ConversionError(f"{path}: truncated safetensors file: tensors need {self.start + end} bytes, "
                                  f"the file has {size}")
        self._map = np.memmap(path, dtype=np.uint8, mode="r") if size else None

    def keys(self):
        return list(self.header)

    def get(self, key: str) -> np.ndarray:
        info = self.header[key]
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise ConversionError(f"{self.path}: tensor {key} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        raw = self._map[self.start + begin:self.start + end]
        return raw.view(SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])


def _torch_to_numpy(t) -> np.ndarray:
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


class TorchFile:
    def __init__(self, path: Path):
        import pickle

        import torch

        self.path = path
        try:
            try:
                self.state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as err:
                if "mmap can only be used" not in str(err):
                    raise
                # legacy (pre-zipfile) format: no mmap, still weights only
                self.state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise ConversionError(f"{path}: refused to load: the pickle asks for more than tensors "
                                  f"({str(err).splitlines()[0][:200]})") from None
        except (RuntimeError, EOFError, OSError) as err:
            raise ConversionError(f"{path}: cannot read PyTorch checkpoint ({str(err).splitlines()[0][:200]})") from None
        if isinstance(self.state, dict) and "state_dict" in self.state and isinstance(self.state["state_dict"], dict):
            self.state = self.state["state_dict"]
        if not isinstance(self.state, dict):
            raise ConversionError(f"{path}: expected a state dict, got {type(self.state).__name__}")

    def keys(self):
        return list(self.state)

    def get(self, key):
        return _torch_to_numpy(self.state[key])


class TensorReader:
    """HF-named tensors from a directory; `get` reads one tensor lazily."""

    def __init__(self, files):
        self.files = files
        self.where: dict[str, object] = {}
        for f in files:
            for k in f.keys():
                self.where.setdefault(k, f)

    def keys(self) -> list[str]:
        return list(self.where)

    def get(self, key: str) -> np.ndarray:
        if key not in self.where:
            raise ConversionError(f"missing tensor {key}")
        return self.where[key].get(key)


def _index_files(directory: Path, index_name: str) -> list[Path]:
    index = json.loads((directory / index_name).read_text())
    names = sorted(set(index.get("weight_map", {}).values()))
    missing = [n for n in names if not (directory / n).is_file()]
    if missing:
        raise ConversionError(f"{directory / index_name} lists {missing[0]}, which is missing")
    return [directory / n for n in names]


def open_hf(directory: str | os.PathLike) -> TensorReader:
    """Reader for an HF directory: safetensors (preferred) or pytorch_model*.bin, sharded or not."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConversionError(f"{directory}: no such directory")
    if (directory / "model.safetensors.index.json").is_file():
        return TensorReader([SafetensorsFile(p) for p in _index_files(directory, "model.safetensors.index.json")])
    single = sorted(directory.glob("*.safetensors"))
    if single:
        return TensorReader([SafetensorsFile(p) for p in single])
    if (directory / "pytorch_model.bin.index.json").is_file():
        return TensorReader([TorchFile(p) for p in _index_files(directory, "pytorch_model.bin.index.json")])
    bins = sorted(directory.glob("pytorch_model*.bin"))
    if bins:
        return TensorReader([TorchFile(p) for p in bins])
    raise ConversionError(f"{directory}: no *.safetensors or pytorch_model*.bin weights found")


# Meta key → (HF key, how model-parallel shards are joined: concat dim, or None = replicated).
_META_LAYER = {
    "attention.wq.weight": ("self_attn.q_proj.weight", 0), "attention.wk.weight": ("self_attn.k_proj.weight", 0),
    "attention.wv.weight": ("self_attn.v_proj.weight", 0), "attention.wo.weight": ("self_attn.o_proj.weight", 1),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", 0), "feed_forward.w2.weight": ("mlp.down_proj.weight", 1),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", 0), "attention_norm.weight": ("input_layernorm.weight", None),
    "ffn_norm.weight": ("post_attention_layernorm.weight", None)}
_META_TOP = {"tok_embeddings.weight": ("model.embed_tokens.weight", 1), "norm.weight": ("model.norm.weight", None),
             "output.weight": ("lm_head.weight", 0)}


def rope_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """Meta (adjacent pairs) → HF (rotate-half) row order within each head (spec §2.3)."""
    rows, cols = w.shape
    return w.reshape(heads, rows // heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def rope_unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    rows, cols = w.shape
    return w.reshape(heads, 2, rows // heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


class MetaReader:
    """Meta's `consolidated.NN.pth` shards + `params.json`, presented under HF Llama names."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.params = json.loads((directory / "params.json").read_text())
        paths = sorted(directory.glob("consolidated.*.pth"))
        if not paths:
            raise ConversionError(f"{directory}: params.json but no consolidated.*.pth shards")
        self.shards = [TorchFile(p) for p in paths]
        self.n_heads = self.params["n_heads"]
        self.n_kv_heads = self.params.get("n_kv_heads") or self.n_heads
        self.names: dict[str, tuple[str, int | None]] = {}
        for key in self.shards[0].keys():
            if key.startswith("layers."):
                _, i, rest = key.split(".", 2)
                if rest in _META_LAYER:
                    hf, dim = _META_LAYER[rest]
                    self.names[f"model.layers.{i}.{hf}"] = (key, dim)
            elif key in _META_TOP:
                hf, dim = _META_TOP[key]
                self.names[hf] = (key, dim)

    def keys(self):
        return list(self.names)

    def get(self, hf_key):
        if hf_key not in self.names:
            raise ConversionError(f"missing tensor {hf_key} in {self.directory}")
        key, dim = self.names[hf_key]
        parts = [s.get(key) for s in self.shards]
        w = parts[0] if dim is None or len(parts) == 1 else np.concatenate(parts, axis=dim)
        if hf_key.endswith("q_proj.weight"):
            w = rope_permute(w, self.n_heads)
        elif hf_key.endswith("k_proj.weight"):
            w = rope_permute(w, self.n_kv_heads)
        return w


def open_source(directory: str | os.PathLike):
    directory = Path(directory)
    if (directory / "params.json").is_file() and list(directory.glob("consolidated.*.pth")):
        return MetaReader(directory)
    return open_hf(directory)
