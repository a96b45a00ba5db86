"""Tensor readers for HF / PyTorch / Meta checkpoints: one tensor at a time, as numpy.

- safetensors (single or sharded with `model.safetensors.index.json`): the header is parsed here and each
  tensor is read with one positioned read into a fresh array (bfloat16 survives bit-exactly, a truncated
  file is caught, and nothing stays mapped into the process after the tensor is dropped).
- `pytorch_model*.bin`: `torch.load(weights_only=True, mmap=True)`; a pickle can never run code.
- Meta `consolidated.*.pth` + `params.json`: model-parallel shards merged and RoPE rows permuted into
  HF's rotate-half layout (spec §2.2–2.3), presented under HF names.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from jaxllm import storage

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
        size = storage.size(path)
        with storage.open(path, "rb") as f:
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

    def keys(self):
        return list(self.header)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.header[key]["shape"])

    def dtype(self, key: str) -> np.dtype:
        name = self.header[key]["dtype"]
        if name not in SAFETENSORS_DTYPES:
            raise ConversionError(f"{self.path}: tensor {key} has unsupported dtype {name}")
        return np.dtype(SAFETENSORS_DTYPES[name])

    def get(self, key: str) -> np.ndarray:
        info = self.header[key]
        dtype = self.dtype(key)
        begin, end = info["data_offsets"]
        out = np.empty(info["shape"], dtype)
        if out.nbytes != end - begin:
            raise ConversionError(f"{self.path}: tensor {key} has {end - begin} bytes, expected {out.nbytes} "
                                  f"for shape {tuple(info['shape'])} {info['dtype']}")
        # A read, not a memory map: mapped pages would stay in the process until the file is closed.
        with storage.open(self.path, "rb") as f:
            f.seek(self.start + begin)
            if f.readinto(memoryview(out.reshape(-1).view(np.uint8))) != out.nbytes:
                raise ConversionError(f"{self.path}: truncated while reading tensor {key}")
        return out


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

    def shape(self, key) -> tuple[int, ...]:
        return tuple(self._tensor(key).shape)

    def dtype(self, key) -> np.dtype:
        import torch

        return _torch_to_numpy(torch.empty(0, dtype=self._tensor(key).dtype)).dtype

    def get(self, key):
        return _torch_to_numpy(self._tensor(key))

    def _tensor(self, key):
        import torch

        t = self.state[key]
        if not isinstance(t, torch.Tensor):
            raise ConversionError(f"{self.path}: entry {key} is a {type(t).__name__}, not a tensor")
        return t


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

    def _file(self, key: str):
        if key not in self.where:
            raise ConversionError(f"missing tensor {key}")
        return self.where[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._file(key).shape(key)

    def dtype(self, key: str) -> np.dtype:
        return self._file(key).dtype(key)

    def get(self, key: str) -> np.ndarray:
        return self._file(key).get(key)


def read_json(path: Path) -> dict:
    """A JSON object from `path`, or a ConversionError naming the file."""
    try:
        data = json.loads(storage.read_text(path))
    except OSError as err:
        raise ConversionError(f"{path}: cannot read ({err.strerror or err})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConversionError(f"{path}: invalid JSON: {getattr(err, 'msg', err)}") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _index_files(directory: Path, index_name: str) -> list[Path]:
    index = read_json(directory / index_name)
    names = sorted(set(index.get("weight_map", {}).values()))
    missing = [n for n in names if not (directory / n).is_file()]
    if missing:
        raise ConversionError(f"{directory / index_name} lists {missing[0]}, which is missing")
    return [directory / n for n in names]


def open_hf(directory: str | os.PathLike) -> TensorReader:
    """Reader for an HF directory: safetensors (preferred) or pytorch_model*.bin, sharded or not."""
    directory = storage.path(directory)
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


# Buffers in Meta's files that carry no parameters (the RoPE table); skipped.
_META_IGNORED = ("rope.freqs",)


class MetaReader:
    """Meta's `consolidated.NN.pth` shards + `params.json`, presented under HF Llama names."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.params = read_json(directory / "params.json")
        for field in ("dim", "n_layers", "n_heads"):
            if field not in self.params:
                raise ConversionError(f"{directory / 'params.json'}: missing field '{field}'")
        paths = sorted(directory.glob("consolidated.*.pth"))
        if not paths:
            raise ConversionError(f"{directory}: params.json but no consolidated.*.pth shards")
        self.shards = [TorchFile(p) for p in paths]
        self.n_heads = self.params["n_heads"]
        self.n_kv_heads = self.params.get("n_kv_heads") or self.n_heads
        self.names: dict[str, tuple[str, int | None]] = {}
        first = self.shards[0]
        for key in first.keys():
            if key.endswith(_META_IGNORED):
                continue
            hf, dim = None, None
            if key.startswith("layers.") and key.count(".") >= 2:
                _, i, rest = key.split(".", 2)
                if i.isdigit() and rest in _META_LAYER:
                    hf, dim = _META_LAYER[rest]
                    hf = f"model.layers.{i}.{hf}"
            elif key in _META_TOP:
                hf, dim = _META_TOP[key]
            if hf is None:
                raise ConversionError(f"{first.path}: unexpected tensor {key} — not a Llama 2 parameter")
            self.names[hf] = (key, dim)
        expected = set(first.keys())
        for shard in self.shards[1:]:
            odd = sorted(set(shard.keys()) ^ expected)
            if odd:
                raise ConversionError(f"{shard.path}: tensor {odd[0]} is in only one of the model-parallel "
                                      f"shards {paths[0].name} and {shard.path.name}")

    def keys(self):
        return list(self.names)

    def _entry(self, hf_key):
        if hf_key not in self.names:
            raise ConversionError(f"missing tensor {hf_key} in {self.directory}")
        return self.names[hf_key]

    def shape(self, hf_key) -> tuple[int, ...]:
        key, dim = self._entry(hf_key)
        shapes = [s.shape(key) for s in self.shards]
        for shard, shape in zip(self.shards, shapes):  # model-parallel shards are equal slices
            if shape != shapes[0]:
                raise ConversionError(f"{shard.path}: tensor {key} has shape {shape}, which does not fit "
                                      f"{shapes[0]} in {self.shards[0].path.name}")
        if dim is None:
            return shapes[0]
        return tuple(sum(s[dim] for s in shapes) if a == dim else n for a, n in enumerate(shapes[0]))

    def dtype(self, hf_key) -> np.dtype:
        return self.shards[0].dtype(self._entry(hf_key)[0])

    def get(self, hf_key):
        key, dim = self._entry(hf_key)
        self.shape(hf_key)  # shards must fit together
        parts = [s.get(key) for s in self.shards]
        w = parts[0] if dim is None or len(parts) == 1 else np.concatenate(parts, axis=dim)
        if hf_key.endswith("q_proj.weight"):
            w = rope_permute(w, self.n_heads)
        elif hf_key.endswith("k_proj.weight"):
            w = rope_permute(w, self.n_kv_heads)
        return w


def open_source(directory: str | os.PathLike):
    directory = storage.path(directory)
    if (directory / "params.json").is_file() and list(directory.glob("consolidated.*.pth")):
        return MetaReader(directory)
    return open_hf(directory)
