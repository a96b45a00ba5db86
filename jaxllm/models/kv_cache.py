"""The KV cache: its layout, and writes at one shared slot or at a slot per row.

k, v: [layers, batch, kv_heads, max_len, head_dim], or (`per_layer`, with parameters in the per-layer
layout of `jaxllm.models.unroll_layers`) a tuple of one [batch, kv_heads, max_len, head_dim] array per
layer: XLA:CPU copies a layer's slice of a stacked array before using it, the whole cache every step.
Heads come before the slots so attention reads each head's keys as one contiguous [max_len, head_dim]
block: decoding against a [.., max_len, kv_heads, ..] layout made XLA:CPU transpose every layer's cache
on every step. segment_ids, positions:
int32[batch, max_len] (segment 0: an empty slot). index: the slot the next token is written at, a
scalar shared by every row (a batch decoded in step) or int32[batch] (continuous batching: each row
its own request, at its own length).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm.config import ModelConfig

KV_CACHE_AXES = {"k": ("layers", "batch", "kv_heads", "length", "head_dim"),
                 "v": ("layers", "batch", "kv_heads", "length", "head_dim"),
                 "segment_ids": ("batch", "length"), "positions": ("batch", "length"), "index": ()}


def init_kv_cache(config: ModelConfig, batch: int, max_len: int, dtype=None, *, per_row: bool = False,
                  per_layer: bool = False) -> dict:
    """Empty cache (module docstring for the layout); `per_row`: index int32[batch] instead of a scalar;
    `per_layer`: k and v as a tuple of per-layer arrays."""
    dtype = jnp.dtype(dtype or config.dtype)
    shape = (batch, config.num_kv_heads, max_len, config.head_dim)
    if per_layer:
        k, v = (tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)) for _ in "kv")
    else:
        k, v = (jnp.zeros((config.num_layers, *shape), dtype) for _ in "kv")
    return {"k": k, "v": v,
            "segment_ids": jnp.zeros((batch, max_len), jnp.int32),
            "positions": jnp.zeros((batch, max_len), jnp.int32),
            "index": jnp.zeros((batch,) if per_row else (), jnp.int32)}


def kv_cache_axes(cache: dict) -> dict:
    """Logical axes of each leaf of `cache` (a per-row index is a batch vector; per-layer k and v a tuple)."""
    axes = {**KV_CACHE_AXES, "index": ("batch",) if cache["index"].ndim else ()}
    if isinstance(cache["k"], tuple):
        axes.update({k: (KV_CACHE_AXES[k][1:],) * len(cache[k]) for k in ("k", "v")})
    return axes


def read_layer(buffer, layer):
    """Layer `layer` of k or v: [batch, kv_heads, max_len, head_dim]."""
    if isinstance(buffer, tuple):
        return buffer[layer]
    return jax.lax.dynamic_index_in_dim(buffer, layer, 0, keepdims=False)


def write_rows(buffer, update, index):
    """buffer int[batch, max_len] with update [batch, t] written at slots index .. index + t - 1."""
    if jnp.ndim(index) == 0:
        return jax.lax.dynamic_update_slice(buffer, update.astype(buffer.dtype), (0, index))
    rows = jnp.arange(buffer.shape[0])[:, None]
    return buffer.at[rows, index[:, None] + jnp.arange(update.shape[1])].set(update.astype(buffer.dtype))


def write_layer(buffer, update, layer, index):
    """buffer [layers, batch, kv_heads, max_len, head_dim] (or a per-layer tuple, `layer` then a Python
    int) with update [batch, t, kv_heads, head_dim] written into layer `layer` at slots index .. index + t - 1
    (in place inside the layer scan)."""
    if isinstance(buffer, tuple):
        return buffer[:layer] + (_write(buffer[layer], update, index),) + buffer[layer + 1:]
    update = update.astype(buffer.dtype)
    if jnp.ndim(index) == 0:
        return jax.lax.dynamic_update_slice(buffer, update.transpose(0, 2, 1, 3)[None], (layer, 0, 0, index, 0))
    rows = jnp.arange(buffer.shape[1])[:, None]
    cols = index[:, None] + jnp.arange(update.shape[1])  # [batch, t]; indexing puts [batch, t] first
    return buffer.at[layer, rows, :, cols, :].set(update)


def _write(buffer, update, index):
    """One layer's [batch, kv_heads, max_len, head_dim] with update [batch, t, kv_heads, head_dim] at
    index .. index + t - 1 (written on the 4-D array itself: a reshape around it made XLA:CPU compute the
    update twice, once for the cache and once for attention, each on a copy)."""
    update = update.astype(buffer.dtype)
    if jnp.ndim(index) == 0:
        return jax.lax.dynamic_update_slice(buffer, update.transpose(0, 2, 1, 3), (0, 0, index, 0))
    rows = jnp.arange(buffer.shape[0])[:, None]
    cols = index[:, None] + jnp.arange(update.shape[1])
    return buffer.at[rows, :, cols, :].set(update)
