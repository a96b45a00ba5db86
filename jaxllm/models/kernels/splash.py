"""JAX's Pallas splash attention (TPU) for the RoPE families: causal, packed segments, grouped KV heads.

    q: [batch, len, heads, head_dim]; k, v: [batch, len, kv_heads, head_dim]; segment_ids: int32[batch, len]
    → [batch, len, heads, head_dim]

Causal self-attention only (no KV cache: decoding stays on the einsum path). The splash MHA kernel takes
`kv_heads` < `heads` itself (query head h reads KV head h // (heads / kv_heads)), so K and V are never
repeated in HBM. Under a mesh the kernel runs per shard (`jax.shard_map`) over the batch and head axes the
rules table (`jaxllm.sharding`) gives activations; off TPU it runs in Pallas' interpreter (tests).

On TPU, bfloat16 inputs need the default matmul precision: under a process-wide
`jax_default_matmul_precision=highest` Mosaic refuses splash's bfloat16 dots ("Bad lhs type").

Residuals: the kernel's custom VJP keeps its output and logsumexp, both named `attn_out`, so the
`save_qkv_out` remat policy keeps them (no attention forward in the backward pass) and `full` recomputes.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from jaxllm.models.kernels import sharded

RESIDUAL_NAME = "attn_out"


def block_size(length: int, largest: int = 512) -> int | None:
    """The largest tile of 512, 256 or 128 rows that divides `length` (None: splash cannot tile it)."""
    for block in (largest, 256, 128):
        if block <= largest and length % block == 0:
            return block
    return None


def supports(q_len: int, kv_len: int, head_dim: int) -> bool:
    return q_len == kv_len and block_size(q_len) is not None


def precision_allows(dtype) -> bool:
    """False for half-precision inputs under a process-wide float32 matmul precision, which splash's
    bfloat16 dots cannot honour on TPU (`auto` then keeps the einsum path)."""
    precision = jax.config.jax_default_matmul_precision
    return jnp.dtype(dtype) == jnp.float32 or precision in (None, "default", "bfloat16", "fastest")


def _kernel(heads: int, length: int, interpret: bool, block: int | None):
    block = block or block_size(length)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                              block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                              block_q_dq=block, block_kv_dq=block)
    mask = splash.MultiHeadMask([splash.CausalMask((length, length)) for _ in range(heads)])
    return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                  residual_checkpoint_name=RESIDUAL_NAME, interpret=interpret)


def _local(q, k, v, segment_ids, *, interpret: bool, block: int | None):
    """One shard: q [b, s, h, d], k/v [b, s, kv, d] (kv divides h)."""
    batch, length, heads, head_dim = q.shape
    kernel = _kernel(heads, length, interpret, block)
    scale = 1.0 / math.sqrt(head_dim)
    qh = (q.astype(jnp.float32) * scale).astype(q.dtype).transpose(0, 2, 1, 3)  # [b, h, s, d]
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    run = lambda q1, k1, v1, seg: kernel(q1, k1, v1, splash.SegmentIds(q=seg, kv=seg))
    out = jax.vmap(run)(qh, kh, vh, segment_ids)
    return out.transpose(0, 2, 1, 3).astype(q.dtype)


def attention(q, k, v, segment_ids, *, interpret: bool | None = None, block: int | None = None) -> jax.Array:
    """Causal splash attention within segments; sharded over the mesh in context, if any.
    block: the tile (a multiple of 128 dividing the length), default `block_size(len)`."""
    if interpret is None:
        interpret = sharded.platform() != "tpu"
    body = functools.partial(_local, interpret=interpret, block=block)
    return sharded.call(body, q, k, v, segment_ids)
