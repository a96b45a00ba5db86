"""Attention pieces: RoPE (HF rotate-half layout), ALiBi slopes, masks, and the attention kernel.

Shapes: q [batch, q_len, heads, head_dim]; k, v [batch, kv_len, kv_heads, head_dim].
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.models.kernels import alibi_flash, sharded, splash


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float):
    """cos, sin: float32[batch, len, head_dim] for int positions [batch, len] (HF `cat(freqs, freqs)`)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate pairs (i, i + d/2) of every head; computed in float32 and cast back (Meta, Baichuan2)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    # each half cast back before the one concatenate: XLA then keeps no float32 copy of the rotated q / k
    # (the same products and sums as x·cos + rotate_half(x)·sin, so the same bits)
    return jnp.concatenate([(x1 * cos[..., :half] - x2 * sin[..., :half]).astype(x.dtype),
                            (x2 * cos[..., half:] + x1 * sin[..., half:]).astype(x.dtype)], axis=-1)


def alibi_slopes(num_heads: int) -> np.ndarray:
    """Baichuan's `_get_interleave`: geometric slopes, interleaved for non-power-of-two head counts."""

    def power_of_two(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(num_heads).is_integer():
        slopes = power_of_two(num_heads)
    else:
        closest = 2 ** math.floor(math.log2(num_heads))
        slopes = power_of_two(closest) + power_of_two(2 * closest)[0::2][: num_heads - closest]
    return np.asarray(slopes, dtype=np.float32)


def attention_mask(q_segment_ids, kv_segment_ids, q_offset) -> jax.Array:
    """bool[batch, 1, q_len, kv_len]: causal by slot index and within the same segment.

    Query t sits at cache slot `q_offset + t` (q_offset: a scalar, or int32[batch] for a cache whose rows
    are at different lengths); segment id 0 marks padding and empty cache slots, which real tokens
    (segment >= 1) never attend to.
    """
    q_len, kv_len = q_segment_ids.shape[1], kv_segment_ids.shape[1]
    q_slot = jnp.asarray(q_offset)[..., None] + jnp.arange(q_len)  # [q_len] or [batch, q_len]
    causal = jnp.arange(kv_len) <= q_slot[..., None]
    same_segment = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    return (causal & same_segment)[:, None]


def target_platform() -> str:
    """The platform being traced for: the devices of the mesh in context (`jax.set_mesh`), else JAX's
    default backend. A TPU program compiled on a CPU host (pre-flight) gets the TPU choices."""
    return sharded.platform()


def choose(impl: str, position: str, dtype, causal: bool, q_len: int, kv_len: int, head_dim: int) -> str:
    """The attention path for `model.attention = impl`: reference (einsum), xla, cudnn or splash.

    auto: on TPU (the mesh's devices) the fused Pallas kernel, `splash`, for causal self-attention whose
    length tiles (a multiple of 128); cuDNN flash attention on GPU in half precision; the einsum path
    elsewhere. A KV cache (decode, cached prefill) always takes the einsum path. `splash` is JAX's splash
    kernel for RoPE families and jaxllm's ALiBi flash kernel (`kernels/alibi_flash.py`) for ALiBi ones;
    forced on shapes it cannot tile it raises rather than falling back. (`auto` also keeps the einsum path
    for splash in bfloat16 under a process-wide float32 matmul precision, which Mosaic refuses there.)
    """
    kernel = alibi_flash if position == "alibi" else splash
    tiles = causal and kernel.supports(q_len, kv_len, head_dim)
    if impl == "splash" and causal:
        if not tiles:
            raise ValueError(f"model.attention=splash: a sequence of {q_len} tokens does not tile in blocks of "
                             f"128; pad it to a multiple of 128 or use attention=auto")
        return "splash"
    if impl == "auto" and tiles and q_len % 128 == 0 and kernel.precision_allows(dtype) \
            and target_platform() == "tpu":
        return "splash"
    return _fused_impl(impl, dtype, causal) or "reference"


def _fused_impl(impl: str, dtype, causal: bool) -> str | None:
    """The `jax.nn.dot_product_attention` implementation for `impl`, or None for the einsum path.

    auto: cuDNN flash attention on GPU in half precision without a KV cache (training, scoring); the
    einsum path elsewhere (on CPU it is the faster one, and decoding attends one query to the cache).
    """
    if impl in ("xla", "cudnn"):
        return impl
    if impl == "auto" and causal and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) \
            and target_platform() in ("gpu", "cuda", "rocm"):
        return "cudnn"
    return None


def attend(q, k, v, mask, *, alibi=None, impl: str = "reference", causal: bool = False,
           kv_heads_first: bool = False, segment_ids=None, positions=None) -> jax.Array:
    """Scaled dot-product attention with grouped KV heads.

    kv_heads_first: k and v are [batch, kv_heads, kv_len, head_dim] (the KV cache's layout; einsum path).

    mask: bool[batch, 1, q_len, kv_len] (None only where `splash` is chosen). alibi: (slopes float32[heads],
    distance float32[batch, q_len, kv_len] or None) with distance = pos_k - pos_q, so the bias is
    slope_h * distance (Baichuan's training form; its inference form differs by a per-row constant, which
    softmax ignores). causal: q and k are the same positions (no cache), so the mask is lower-triangular
    within segments and the fused kernels apply; they take `segment_ids` and (ALiBi) `positions`,
    int32[batch, len], instead of the mask and the distance.
    """
    batch, q_len, heads, head_dim = q.shape
    kv_len = k.shape[2 if kv_heads_first else 1]
    path = choose(impl, "alibi" if alibi is not None else "rope", q.dtype, causal, q_len, kv_len, head_dim)
    if path == "splash":
        if alibi is not None:
            return alibi_flash.attention(q, k, v, segment_ids, positions, alibi[0])
        return splash.attention(q, k, v, segment_ids)
    fused = None if path == "reference" else path
    if mask is None:
        mask = attention_mask(segment_ids, segment_ids, 0)
    if alibi is not None and alibi[1] is None:
        alibi = (alibi[0], (positions[:, None, :] - positions[:, :, None]).astype(jnp.float32))
    if fused is not None and kv_heads_first:  # the fused kernels take [batch, kv_len, kv_heads, head_dim]
        k, v, kv_heads_first = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), False
    kv_heads = k.shape[1 if kv_heads_first else 2]
    if fused is not None:
        bias = None
        if alibi is not None:
            slopes, distance = alibi
            bias = (slopes[None, :, None, None] * distance[:, None]).astype(q.dtype)
        # The mask still carries the segments of packed rows; is_causal lets cuDNN skip the upper triangle.
        call = lambda name: jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask,
                                                         is_causal=causal and name == "cudnn", implementation=name)
        if impl == "auto":
            try:  # cuDNN refuses some GPUs, versions and shapes when traced: use XLA's kernel there
                return call(fused)
            except (RuntimeError, ValueError, NotImplementedError):
                return call("xla")
        return call(fused)
    rep = heads // kv_heads
    qg = q.reshape(batch, q_len, kv_heads, rep, head_dim)
    kv_spec = "bgsd" if kv_heads_first else "bsgd"
    scores = jnp.einsum(f"btgrd,{kv_spec}->bgrts", qg, k, preferred_element_type=jnp.float32)
    scores = scores / jnp.sqrt(jnp.float32(head_dim))
    if alibi is not None:
        slopes, distance = alibi
        bias = slopes.reshape(kv_heads, rep)[None, :, :, None, None] * distance[:, None, None]
        scores = scores + bias
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum(f"bgrts,{kv_spec}->btgrd", probs, v)
    return out.reshape(batch, q_len, heads, head_dim)
