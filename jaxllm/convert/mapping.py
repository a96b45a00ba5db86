"""HF ⇄ jaxllm tensor map, as data. One table per layout; both directions come from it.

Each `TensorMap` says which HF tensor feeds which jaxllm leaves (a leaf under `layers/` is one slice of
the layer-stacked array) and how the shapes change. HF Linear weights are [out, in]; ours are [in, out]
with heads split out: q [embed, heads, head_dim], o [heads, head_dim, embed].
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

import numpy as np

from jaxllm.config import ModelConfig

LLAMA_LAYOUT_FAMILIES = ("llama", "ctllm", "ziya")
BAICHUAN_FAMILIES = ("baichuan", "baichuan2")
LAYOUTS = ("llama", "baichuan")  # q/k/v_proj; Baichuan's fused W_pack


def native_layout(cfg: ModelConfig) -> str:
    return "baichuan" if cfg.family in BAICHUAN_FAMILIES else "llama"


def layout_of(keys) -> str:
    """The layout of a checkpoint's tensor names: a fused `W_pack` is Baichuan's, anything else Llama's
    (a Baichuan model exported with `--hf-arch llama` is read back as what it is)."""
    return "baichuan" if any(k.endswith("self_attn.W_pack.weight") for k in keys) else "llama"


@dataclasses.dataclass(frozen=True)
class TensorMap:
    hf_key: str
    hf_shape: tuple[int, ...]
    leaves: tuple[tuple[str, ...], ...]     # jaxllm paths fed by this tensor
    layer: int | None                       # slice of the stacked `layers` axis, or None
    to_jax: Callable[[np.ndarray], list[np.ndarray]]
    to_hf: Callable[[list[np.ndarray]], np.ndarray]
    # leaf j alone (saves computing the others when leaves are written one at a time)
    to_jax_part: Callable[[np.ndarray, int], np.ndarray] | None = None

    def leaf(self, w: np.ndarray, j: int) -> np.ndarray:
        return self.to_jax_part(w, j) if self.to_jax_part is not None else self.to_jax(w)[j]


def _in_heads(heads, head_dim):
    """HF [heads*head_dim, embed] → [embed, heads, head_dim]."""
    return (lambda w: [np.ascontiguousarray(w.T).reshape(w.shape[1], heads, head_dim)],
            lambda ws: np.ascontiguousarray(ws[0].reshape(ws[0].shape[0], -1).T))


def _out_heads(heads, head_dim):
    """HF [embed, heads*head_dim] → [heads, head_dim, embed]."""
    return (lambda w: [np.ascontiguousarray(w.T).reshape(heads, head_dim, w.shape[0])],
            lambda ws: np.ascontiguousarray(ws[0].reshape(-1, ws[0].shape[-1]).T))


_TRANSPOSE = (lambda w: [np.ascontiguousarray(w.T)], lambda ws: np.ascontiguousarray(ws[0].T))
_SAME = (lambda w: [w], lambda ws: ws[0])


def _w_pack(cfg: ModelConfig):
    """Baichuan's fused [3H, H] = rows q | k | v → three [H, heads, head_dim] leaves."""
    h, n, d = cfg.hidden_size, cfg.num_heads, cfg.head_dim

    def part(w, j):
        return np.ascontiguousarray(w[j * h:(j + 1) * h].T).reshape(h, n, d)

    def to_jax(w):
        return [part(w, j) for j in range(3)]

    def to_hf(ws):
        return np.concatenate([w.reshape(h, n * d).T for w in ws], axis=0)

    return to_jax, to_hf, part


def tensor_maps(cfg: ModelConfig, layout: str | None = None) -> list[TensorMap]:
    """Every HF tensor of `cfg` in `layout` (default: the family's own), in HF's usual order (embeddings,
    layers, norm, head)."""
    layout = layout or native_layout(cfg)
    h, f, n, k, d, v = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads,
                        cfg.head_dim, cfg.vocab_size)
    maps = [TensorMap("model.embed_tokens.weight", (v, h), (("embedding",),), None, *_SAME)]
    for i in range(cfg.num_layers):
        pre = f"model.layers.{i}."
        layer = lambda key, shape, leaves, fns: TensorMap(pre + key, shape, leaves, i, *fns)
        maps.append(layer("input_layernorm.weight", (h,), (("layers", "attn_norm", "scale"),), _SAME))
        if layout == "baichuan":
            maps.append(layer("self_attn.W_pack.weight", (3 * h, h),
                              tuple(("layers", "attn", w) for w in ("wq", "wk", "wv")), _w_pack(cfg)))
        else:
            maps.append(layer("self_attn.q_proj.weight", (n * d, h), (("layers", "attn", "wq"),),
                              _in_heads(n, d)))
            maps.append(layer("self_attn.k_proj.weight", (k * d, h), (("layers", "attn", "wk"),),
                              _in_heads(k, d)))
            maps.append(layer("self_attn.v_proj.weight", (k * d, h), (("layers", "attn", "wv"),),
                              _in_heads(k, d)))
        maps.append(layer("self_attn.o_proj.weight", (h, n * d), (("layers", "attn", "wo"),),
                          _out_heads(n, d)))
        maps.append(layer("post_attention_layernorm.weight", (h,), (("layers", "mlp_norm", "scale"),),
                          _SAME))
        maps.append(layer("mlp.gate_proj.weight", (f, h), (("layers", "mlp", "gate"),), _TRANSPOSE))
        maps.append(layer("mlp.up_proj.weight", (f, h), (("layers", "mlp", "up"),), _TRANSPOSE))
        maps.append(layer("mlp.down_proj.weight", (h, f), (("layers", "mlp", "down"),), _TRANSPOSE))
    maps.append(TensorMap("model.norm.weight", (h,), (("final_norm", "scale"),), None, *_SAME))
    if not cfg.tie_embeddings:
        # NormHead: the raw (unnormalised) weight is stored on both sides, except in the Llama layout,
        # whose stock model has no NormHead: there its rows are exported normalised.
        head = _TRANSPOSE
        if cfg.norm_head and layout == "llama":
            head = (_TRANSPOSE[0], lambda ws: unit_rows(ws[0].T))
        maps.append(TensorMap("lm_head.weight", (v, h), (("lm_head",),), None, *head))
    return maps


def unit_rows(w: np.ndarray) -> np.ndarray:
    """NormHead's normalisation of `w` [vocab, embed] (F.normalize, eps 1e-12), in float32."""
    w32 = np.asarray(w, np.float32)
    return w32 / np.maximum(np.sqrt(np.sum(w32 * w32, axis=1, keepdims=True)), np.float32(1e-12))


# HF buffers that carry no parameters (recomputed from the config); ignored on load.
IGNORED_HF_KEYS = ("rotary_emb.inv_freq",)


def is_ignored(hf_key: str) -> bool:
    return any(hf_key.endswith(suffix) for suffix in IGNORED_HF_KEYS)


def get_path(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def set_path(tree, path, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def hf_to_params(get_tensor: Callable[[str], np.ndarray], cfg: ModelConfig, dtype=None,
                 layout: str | None = None) -> dict:
    """Build the jaxllm parameter tree (numpy) from `get_tensor(hf_key)`; in memory, for small models
    and tests (`jaxllm.convert` streams instead)."""
    from jaxllm.models import param_shapes

    shapes = param_shapes(cfg)
    params: dict = {}
    for m in tensor_maps(cfg, layout):
        w = np.asarray(get_tensor(m.hf_key))
        if tuple(w.shape) != m.hf_shape:
            raise ValueError(f"tensor {m.hf_key}: expected shape {m.hf_shape}, got {tuple(w.shape)}")
        for path, value in zip(m.leaves, m.to_jax(w)):
            if m.layer is None:
                set_path(params, path, value.astype(dtype or value.dtype))
                continue
            try:
                stacked = get_path(params, path)
            except KeyError:
                stacked = np.empty(get_path(shapes, path).shape, dtype or value.dtype)
                set_path(params, path, stacked)
            stacked[m.layer] = value
    return params


def params_to_hf(params, cfg: ModelConfig, layout: str | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (hf_key, array) for every HF tensor, one at a time."""
    for m in tensor_maps(cfg, layout):
        leaves = [np.asarray(get_path(params, p)) for p in m.leaves]
        if m.layer is not None:
            leaves = [leaf[m.layer] for leaf in leaves]
        yield m.hf_key, m.to_hf(leaves)
