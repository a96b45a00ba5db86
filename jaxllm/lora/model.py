"""LoRA adapters as parameters of the one decoder (PEFT's definition), and the trainable / frozen split.

With `config.lora` set, each targeted projection W gets two more leaves beside it, layer-stacked like it,
with logical axes like any other parameter (the rank axis `lora` is replicated):

    layers/attn/wq_lora_a    [layers, embed, lora]           wq_lora_b [layers, lora, heads, head_dim]
    layers/attn/wqkv_lora_a  [layers, embed, lora]           target qkv: one A for wq/wk/wv_lora_b
    layers/attn/wo_lora_a    [layers, heads, head_dim, lora] wo_lora_b [layers, lora, embed]
    layers/mlp/gate_lora_a   [layers, embed, lora]           gate_lora_b [layers, lora, mlp]   (up alike)
    layers/mlp/down_lora_a   [layers, mlp, lora]             down_lora_b [layers, lora, embed]

and y = x·W + (alpha/rank)·(dropout(x)·A)·B. A starts uniform in ±1/sqrt(fan_in) and B at zero (PEFT's
init), so a new adapter leaves the model unchanged. Target `qkv` is PEFT's adapter on Baichuan's fused
W_pack (A [H, r] shared, B [3H, r] split into q/k/v rows), exactly; separate q/k/v adapters export to
W_pack as one rank-3r block adapter (A stacked, B block-diagonal), also exactly (`jaxllm.lora.peft`).

The decoder calls `adapt` after each projection; dropout draws from the `dropout` rng stream, so it is
active only when `forward` is given an rng (training).
"""
from __future__ import annotations

import math
import string

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

# Adapted weight → (its target name, logical axes of its input dims, of its output dims).
WEIGHTS = {
    "wq": ("q", ("embed",), ("heads", "head_dim")),
    "wk": ("k", ("embed",), ("kv_heads", "head_dim")),
    "wv": ("v", ("embed",), ("kv_heads", "head_dim")),
    "wo": ("o", ("heads", "head_dim"), ("embed",)),
    "gate": ("gate", ("embed",), ("mlp",)),
    "up": ("up", ("embed",), ("mlp",)),
    "down": ("down", ("mlp",), ("embed",)),
}
SHARED_QKV = "wqkv"
RANK_AXIS = "lora"
# Base weights a LoRA run may also train (lora.train), by the parameter names that hold them.
TRAINABLE_BASE = {"embedding": ("embedding",), "lm_head": ("lm_head",),
                  "norms": ("attn_norm", "mlp_norm", "final_norm")}


def is_adapter_key(key: str) -> bool:
    return key.endswith(("_lora_a", "_lora_b"))


def _uniform_fan_in(fan_in: int):
    bound = 1.0 / math.sqrt(fan_in)  # PEFT: kaiming_uniform(a=sqrt(5)) on A [rank, fan_in]
    return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)


def _specs(x_ndim: int, n_in: int, n_out: int) -> tuple[str, str]:
    """einsum specs x[..., in] · A[in, r] → [..., r] and low[..., r] · B[r, out] → [..., out]."""
    letters = iter(string.ascii_lowercase.replace("r", ""))
    lead = "".join(next(letters) for _ in range(x_ndim - n_in))
    ins = "".join(next(letters) for _ in range(n_in))
    outs = "".join(next(letters) for _ in range(n_out))
    return f"{lead}{ins},{ins}r->{lead}r", f"{lead}r,r{outs}->{lead}{outs}"


def _a_param(module, name, x_shape, n_in, axes_in):
    cfg = module.config
    dims = tuple(x_shape[len(x_shape) - n_in:])
    init = nn.with_logical_partitioning(_uniform_fan_in(math.prod(dims)), (*axes_in, RANK_AXIS))
    return module.param(name + "_lora_a", init, (*dims, cfg.lora.rank), cfg.param_dtype)


def _dropout(module, x):
    rate = module.config.lora.dropout
    if not rate or not module.has_rng("dropout"):
        return x
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


def shared_input(module, x, dense):
    """dropout(x)·A of the shared q/k/v adapter (target qkv): one dropout mask and one A for all three, as
    PEFT's single W_pack adapter; None when the model has no such adapter."""
    lora = module.config.lora
    if lora is None or "qkv" not in lora.targets:
        return None
    a = _a_param(module, SHARED_QKV, x.shape, 1, WEIGHTS["wq"][1])
    spec_a, _ = _specs(x.ndim, 1, 2)
    return dense(spec_a, _dropout(module, x), a.astype(module.config.dtype), 1)


def adapter_target(spec, name: str) -> str:
    """The target whose adapter weight `name` (wq, ..., down) gets: its own, or qkv (the shared W_pack A)."""
    target = WEIGHTS[name][0]
    return "qkv" if target in ("q", "k", "v") and "qkv" in spec.targets else target


def layer_scale(spec, name: str, layer: int, num_layers: int) -> float:
    """The scale of weight `name`'s adapter in layer `layer`."""
    scales = spec.layer_scales(adapter_target(spec, name), num_layers)
    return spec.scale if scales is None else scales[layer]


def adapt(module, name: str, x, out, out_ndim: int, n_in: int, dense, shared=None, layer=None):
    """`out` = x·W of weight `name` (x's last `n_in` dims contracted), plus its adapter's
    scale·(dropout(x)·A)·B when the model has one. `dense(spec, x, w, n_in)`: the decoder's matmul; `layer`:
    the layer's index (an int or a traced int32), which picks its scale when the spec has per-layer ones."""
    lora = module.config.lora
    if lora is None:
        return out
    target, axes_in, axes_out = WEIGHTS[name]
    spec_a, spec_b = _specs(x.ndim, n_in, out_ndim)
    dt = module.config.dtype
    if target in ("q", "k", "v") and "qkv" in lora.targets:
        low = shared
    elif target in lora.targets:
        a = _a_param(module, name, x.shape, n_in, axes_in)
        low = dense(spec_a, _dropout(module, x), a.astype(dt), n_in)
    else:
        return out
    b = module.param(name + "_lora_b", nn.with_logical_partitioning(nn.initializers.zeros, (RANK_AXIS, *axes_out)),
                     (lora.rank, *out.shape[out.ndim - out_ndim:]), module.config.param_dtype)
    delta = dense(spec_b, low, b.astype(dt), 1)
    scales = lora.layer_scales(adapter_target(lora, name), module.config.num_layers)
    scale = jnp.asarray(lora.scale, delta.dtype) if scales is None else jnp.asarray(scales, delta.dtype)[layer]
    return out + (delta * scale).astype(out.dtype)


# ---------------------------------------------------------------------------------------------------------
# Parameter trees: which leaves train, and the trainable / frozen halves.

def _keys(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def trainable_mask(tree, train=(), lm_path: tuple[str, ...] = ()):
    """Pytree of bools like `tree` (params, shapes or logical axes): True for every adapter leaf, every leaf
    outside the language model's subtree `lm_path` (a reward model's new head), and the base weights that
    `train` names (embedding, lm_head, norms); False for the rest, the frozen base."""
    names = {name for group in train for name in TRAINABLE_BASE[group]}
    n = len(lm_path)

    def trains(path, _):
        keys = _keys(path)
        if keys[:n] != tuple(lm_path):
            return True
        return is_adapter_key(keys[-1]) or bool(names & set(keys[n:]))

    return jax.tree_util.tree_map_with_path(trains, tree, is_leaf=lambda x: isinstance(x, P))


def split(tree, mask):
    """(leaves where mask, the others) as two nested dicts keeping the tree's paths; `merge` undoes it."""
    def go(node, m):
        if not isinstance(node, dict):
            return (node, None) if m else (None, node)
        yes, no = {}, {}
        for key, child in node.items():
            a, b = go(child, m[key])
            if a is not None and not (isinstance(a, dict) and not a):
                yes[key] = a
            if b is not None and not (isinstance(b, dict) and not b):
                no[key] = b
        return yes, no

    return go(tree, mask)


def merge(a, b):
    """Union of two nested dicts of parameters (a leaf in both: `a`'s wins)."""
    if not isinstance(a, dict) or not isinstance(b, dict):
        return a
    out = dict(b)
    for key, value in a.items():
        out[key] = merge(value, b[key]) if key in b else value
    return out


def leaf_paths(tree, is_leaf=None) -> list[tuple[str, ...]]:
    """The key path of every leaf, in `jax.tree.leaves` order."""
    return [_keys(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]]


# ---------------------------------------------------------------------------------------------------------
# Merging adapters into their weights (export, inference without the adapter matmuls).

def delta(a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    """(alpha/rank)·A·B for one layer: A [*in, r], B [r, *out] → [*in, *out] (float32)."""
    a32, b32 = np.asarray(a, np.float32), np.asarray(b, np.float32)
    flat = a32.reshape(-1, a32.shape[-1]) @ b32.reshape(b32.shape[0], -1)
    return (scale * flat).reshape(*a32.shape[:-1], *b32.shape[1:])


def merged_layer(name: str, layer: int, weight: np.ndarray, adapters: dict, scale: float) -> np.ndarray:
    """Layer `layer` of base weight `name` with its adapter added (in float32, cast back to the weight's
    dtype); `adapters`: the layer-stacked `*_lora_a/_lora_b` leaves of its module."""
    a = adapters.get(f"{name}_lora_a", adapters.get(f"{SHARED_QKV}_lora_a") if name in ("wq", "wk", "wv") else None)
    b = adapters.get(f"{name}_lora_b")
    if a is None or b is None:
        return weight
    return (np.asarray(weight, np.float32) + delta(a[layer], b[layer], scale)).astype(weight.dtype)
