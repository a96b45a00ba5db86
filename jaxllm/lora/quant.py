"""Weight-only quantization of a frozen base (QLoRA-style memory): int8 per output channel, int4 per group of
input rows. Only the seven per-layer projections are quantized; embeddings, head and norms keep the
compute dtype. The decoder dequantizes a layer's weight to the compute dtype just before its matmul.

A quantized leaf is a `QuantizedWeight`, a pytree with two arrays, layer-stacked like the weight:
    qvalue  int8 / int4, the weight's shape [*in, *out]
    scale   float32 [groups, *out]: w ≈ qvalue · scale, one scale per output column and group of
            `in_size / groups` consecutive input rows (flattened over the input dims); int8 uses one group.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import PartitionSpec as P

from jaxllm.lora.model import WEIGHTS

BASE_DTYPES = ("float32", "bfloat16", "float16", "int8", "int4")
QUANTIZED = {"int8": (jnp.int8, 127), "int4": (jnp.int4, 7)}
INT4_GROUP = 128


@struct.dataclass
class QuantizedWeight:
    qvalue: jax.Array
    scale: jax.Array
    n_in: int = struct.field(pytree_node=False, default=1)   # leading input dims of the (per-layer) weight

    @property
    def shape(self):
        return self.qvalue.shape


def is_quantizable(path: tuple[str, ...]) -> bool:
    """The per-layer projections (layer-stacked leaves named like the decoder's weights)."""
    return "layers" in path and path[-1] in WEIGHTS


def _groups(in_size: int, kind: str) -> int:
    return 1 if kind == "int8" else in_size // math.gcd(in_size, INT4_GROUP)


def quantize(w: jax.Array, kind: str, n_in: int) -> QuantizedWeight:
    """Symmetric absmax quantization of a layer-stacked weight [layers, *in, *out]."""
    dtype, top = QUANTIZED[kind]
    layers, ins, outs = w.shape[0], w.shape[1:1 + n_in], w.shape[1 + n_in:]
    size = math.prod(ins)
    groups = _groups(size, kind)
    w32 = w.astype(jnp.float32).reshape(layers, groups, size // groups, *outs)
    scale = jnp.max(jnp.abs(w32), axis=2) / top
    safe = jnp.where(scale == 0, 1.0, scale)
    q = jnp.clip(jnp.round(w32 / safe[:, :, None]), -top, top).astype(dtype).reshape(w.shape)
    return QuantizedWeight(q, scale, n_in)


def dequantize(w, dtype):
    """A weight in the compute dtype: cast, or dequantized (per layer: qvalue [*in, *out], scale [groups, *out])."""
    if not isinstance(w, QuantizedWeight):
        return w.astype(dtype)
    q, scale = w.qvalue, w.scale
    outs = scale.shape[1:]
    groups = scale.shape[0]
    full = q.reshape(groups, -1, *outs).astype(dtype) * scale.astype(dtype)[:, None]
    return full.reshape(q.shape)


def storage_shape(path, shape: jax.ShapeDtypeStruct, base_dtype: str, compute_dtype: str):
    """What a frozen leaf is stored as: ShapeDtypeStruct in `base_dtype` (the compute dtype when that is a
    quantized kind the leaf cannot take), or a QuantizedWeight of ShapeDtypeStructs."""
    if base_dtype not in QUANTIZED:
        return jax.ShapeDtypeStruct(shape.shape, jnp.dtype(base_dtype))
    if not is_quantizable(path):
        return jax.ShapeDtypeStruct(shape.shape, jnp.dtype(compute_dtype))
    n_in = len(WEIGHTS[path[-1]][1])
    ins, outs = shape.shape[1:1 + n_in], shape.shape[1 + n_in:]
    groups = _groups(math.prod(ins), base_dtype)
    return QuantizedWeight(jax.ShapeDtypeStruct(shape.shape, QUANTIZED[base_dtype][0]),
                           jax.ShapeDtypeStruct((shape.shape[0], groups, *outs), jnp.float32), n_in)


def storage_axes(axes: P, stored) -> P | QuantizedWeight:
    """Logical axes of a stored leaf: the weight's own, and for scales the layer and output axes."""
    if not isinstance(stored, QuantizedWeight):
        return axes
    out_axes = tuple(axes)[1 + stored.n_in:]
    return QuantizedWeight(axes, P(tuple(axes)[0], None, *out_axes), stored.n_in)


def nbytes(tree) -> int:
    """Bytes of a tree of arrays or shapes, int4 packed two to a byte (as devices store it)."""
    return sum(math.prod(x.shape) * jax.dtypes.itemsize_bits(x.dtype) // 8 for x in jax.tree.leaves(tree))
