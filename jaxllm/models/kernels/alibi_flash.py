"""jaxllm's Pallas TPU flash attention with ALiBi, forward and backward (Baichuan-13B, Baichuan2-13B).

    q: [batch, len, heads, head_dim]; k, v: [batch, len, kv_heads, head_dim]; segment_ids, positions:
    int32[batch, len]; slopes: float32[heads] → [batch, len, heads, head_dim]

Causal self-attention within segments: query t sees key s <= t (by index, as the einsum path's mask) of the
same segment. The bias `slope[h] · (pos_k − pos_q)` is computed inside the kernel, tile by tile, from the
slopes (scalar-prefetched into SMEM) and the positions, so no [heads, q, kv] bias or score matrix is ever
in HBM: the einsum path's training form (Baichuan's `m_h (j − i)`), the same float32 values. Online softmax
with float32 accumulation; the forward saves the output and the logsumexp (both named `attn_out` for the
remat policies) and the backward recomputes each tile's probabilities from them:

    forward  grid (batch, heads, q blocks, kv blocks)          → out, logsumexp
    dq       grid (batch, heads, q blocks, kv blocks)          → dq
    dk, dv   grid (batch, kv heads, kv blocks, group × q blocks) → dk, dv, summed over the query heads of
             each KV head inside the kernel (grouped KV heads are never repeated in HBM)

Tiles above the diagonal are skipped (and their index maps point at a tile already loaded, so no copy).
Off TPU, `interpret=True` runs the same kernels in Pallas' interpreter (tests).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxllm.models.kernels import sharded

RESIDUAL_NAME = "attn_out"
LANES = 128
MASK_VALUE = float(jnp.finfo(jnp.float32).min)
_NT = (((1,), (1,)), ((), ()))  # a @ b.T


def block_size(length: int, largest: int = 512) -> int | None:
    """The tile: the largest of 512, 256, 128 that divides `length`; a short sequence is one tile."""
    for block in (largest, 256, 128):
        if block <= largest and length % block == 0:
            return block
    return length if length <= largest else None


def supports(q_len: int, kv_len: int, head_dim: int) -> bool:
    return q_len == kv_len and block_size(q_len) is not None


def _precision(dtype):
    """float32 tiles multiply in float32 (the einsum path's precision); bfloat16 ones at their own (Mosaic
    refuses float32 passes on bfloat16 operands, as a process-wide "highest" precision would ask)."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def _dot(a, b, dims=(((1,), (0,)), ((), ()))):
    return lax.dot_general(a, b, dims, precision=_precision(a.dtype), preferred_element_type=jnp.float32)


def precision_allows(dtype) -> bool:
    """Any process-wide matmul precision: the kernel sets each dot's precision from its operands."""
    return True


def _logits(slope, q, k, q_seg, k_seg, q_pos, k_pos, i, j, *, scale, bq, bkv):
    """float32[bq, bkv] scaled scores + ALiBi bias, and the mask (causal by index, same segment)."""
    s = _dot(q, k, _NT) * scale
    s = s + slope * (k_pos - q_pos).astype(jnp.float32)
    rows = i * bq + lax.broadcasted_iota(jnp.int32, (bq, bkv), 0)
    cols = j * bkv + lax.broadcasted_iota(jnp.int32, (bq, bkv), 1)
    mask = (cols <= rows) & (q_seg == k_seg)
    return jnp.where(mask, s, MASK_VALUE), mask


def _column(ref):
    """A q-side [1, block] tile as a column [block, 1]."""
    return jnp.expand_dims(ref[0], -1)


def _fwd_kernel(slopes_ref, q_ref, k_ref, v_ref, qseg_ref, kseg_ref, qpos_ref, kpos_ref,
                o_ref, lse_ref, m_sc, l_sc, acc_sc, *, scale, bq, bkv, kv_blocks):
    h, i, j = pl.program_id(1), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full_like(m_sc, MASK_VALUE)
        l_sc[...] = jnp.zeros_like(l_sc)
        acc_sc[...] = jnp.zeros_like(acc_sc)

    @pl.when(j * bkv <= i * bq + bq - 1)
    def _run():
        s, mask = _logits(slopes_ref[h], q_ref[...], k_ref[...], _column(qseg_ref), kseg_ref[...],
                          _column(qpos_ref), kpos_ref[...], i, j, scale=scale, bq=bq, bkv=bkv)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))  # [bq, LANES]
        p = jnp.where(mask, jnp.exp(s - m_new[:, :1]), 0.0)
        alpha = jnp.exp(m_prev - m_new)
        l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
        acc_sc[...] = acc_sc[...] * alpha[:, :1] + _dot(p.astype(v_ref.dtype), v_ref[...])
        m_sc[...] = m_new

    @pl.when(j == kv_blocks - 1)
    def _end():
        l = l_sc[...]
        o_ref[...] = (acc_sc[...] / l[:, :1]).astype(o_ref.dtype)
        lse_ref[...] = (m_sc[...] + jnp.log(l)).T[:1, :]  # a [1, bq] row: the logsumexp stays [b, h, 1, s]


def _dq_kernel(slopes_ref, q_ref, k_ref, v_ref, qseg_ref, kseg_ref, qpos_ref, kpos_ref, lse_ref, di_ref,
               do_ref, dq_ref, dq_sc, *, scale, bq, bkv, kv_blocks):
    h, i, j = pl.program_id(1), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        dq_sc[...] = jnp.zeros_like(dq_sc)

    @pl.when(j * bkv <= i * bq + bq - 1)
    def _run():
        k, v = k_ref[...], v_ref[...]
        s, mask = _logits(slopes_ref[h], q_ref[...], k, _column(qseg_ref), kseg_ref[...],
                          _column(qpos_ref), kpos_ref[...], i, j, scale=scale, bq=bq, bkv=bkv)
        p = jnp.where(mask, jnp.exp(s - _column(lse_ref)), 0.0)
        dp = _dot(do_ref[...], v, _NT)
        ds = p * (dp - _column(di_ref))
        dq_sc[...] += _dot(ds.astype(k.dtype), k)

    @pl.when(j == kv_blocks - 1)
    def _end():
        dq_ref[...] = (dq_sc[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(slopes_ref, q_ref, k_ref, v_ref, qseg_ref, kseg_ref, qpos_ref, kpos_ref, lse_ref, di_ref,
                do_ref, dk_ref, dv_ref, dk_sc, dv_sc, *, scale, bq, bkv, q_blocks, group):
    g, j, t = pl.program_id(1), pl.program_id(2), pl.program_id(3)
    h, i = g * group + t // q_blocks, t % q_blocks

    @pl.when(t == 0)
    def _init():
        dk_sc[...] = jnp.zeros_like(dk_sc)
        dv_sc[...] = jnp.zeros_like(dv_sc)

    @pl.when(i * bq + bq - 1 >= j * bkv)
    def _run():
        q, do = q_ref[...], do_ref[...]
        s, mask = _logits(slopes_ref[h], q, k_ref[...], _column(qseg_ref), kseg_ref[...],
                          _column(qpos_ref), kpos_ref[...], i, j, scale=scale, bq=bq, bkv=bkv)
        p = jnp.where(mask, jnp.exp(s - _column(lse_ref)), 0.0)
        dv_sc[...] += _dot(p.T.astype(do.dtype), do)
        dp = _dot(do, v_ref[...], _NT)
        ds = p * (dp - _column(di_ref))
        dk_sc[...] += _dot(ds.T.astype(q.dtype), q)

    @pl.when(t == group * q_blocks - 1)
    def _end():
        dk_ref[...] = (dk_sc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _params(n_parallel: int):
    return pltpu.CompilerParams(dimension_semantics=("parallel",) * n_parallel + ("arbitrary",))


def _as_rows(x):
    """int32[b, s] → [b, 1, s]: (1, block) tiles, read as rows on the key side and as columns on the query side."""
    return x[:, None, :]


def _query_major_specs(bq, bkv, head_dim, group):
    """BlockSpecs for a grid (batch, head, q tile i, kv tile j): q-side tiles follow i, k/v-side tiles follow j
    up to the last one q tile i sees (then repeat it: skipped tiles need no copy). Returns the q tile, the
    k/v tile, the [segment q, segment kv, position q, position kv] tiles and the per-query statistic tile."""
    last_kv = lambda i: (i * bq + bq - 1) // bkv
    q_tile = pl.BlockSpec((None, None, bq, head_dim), lambda b, h, i, j, _: (b, h, i, 0))
    kv_tile = pl.BlockSpec((None, None, bkv, head_dim), lambda b, h, i, j, _: (b, h // group, jnp.minimum(j, last_kv(i)), 0))
    q_row = pl.BlockSpec((None, 1, bq), lambda b, h, i, j, _: (b, 0, i))
    kv_row = pl.BlockSpec((None, 1, bkv), lambda b, h, i, j, _: (b, 0, jnp.minimum(j, last_kv(i))))
    stat = pl.BlockSpec((None, None, 1, bq), lambda b, h, i, j, _: (b, h, 0, i))
    return q_tile, kv_tile, [q_row, kv_row, q_row, kv_row], stat


def _key_major_specs(bq, bkv, head_dim, group, q_blocks):
    """The same for a grid (batch, KV head g, kv tile j, t): t runs over (query head of g, q tile), the
    reduction of dk and dv; q tiles before the first one that sees kv tile j repeat that one."""
    head = lambda g, t: g * group + t // q_blocks
    q_index = lambda j, t: jnp.maximum(t % q_blocks, (j * bkv) // bq)
    q_tile = pl.BlockSpec((None, None, bq, head_dim), lambda b, g, j, t, _: (b, head(g, t), q_index(j, t), 0))
    kv_tile = pl.BlockSpec((None, None, bkv, head_dim), lambda b, g, j, t, _: (b, g, j, 0))
    q_row = pl.BlockSpec((None, 1, bq), lambda b, g, j, t, _: (b, 0, q_index(j, t)))
    kv_row = pl.BlockSpec((None, 1, bkv), lambda b, g, j, t, _: (b, 0, j))
    stat = pl.BlockSpec((None, None, 1, bq), lambda b, g, j, t, _: (b, head(g, t), 0, q_index(j, t)))
    return q_tile, kv_tile, [q_row, kv_row, q_row, kv_row], stat


def _forward(q, k, v, seg, pos, slopes, interpret, block):
    """q [b, h, s, d], k/v [b, kv, s, d] (kernel layout) → out [b, h, s, d], lse float32[b, h, 1, s]."""
    batch, heads, length, head_dim = q.shape
    group, bq = heads // k.shape[1], block or block_size(length)
    bkv, n = bq, length // bq
    q_tile, kv_tile, rows, stat = _query_major_specs(bq, bkv, head_dim, group)
    seg, pos = _as_rows(seg), _as_rows(pos)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, scale=1.0 / math.sqrt(head_dim), bq=bq, bkv=bkv, kv_blocks=n),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(batch, heads, n, n),
            in_specs=[q_tile, kv_tile, kv_tile, *rows], out_specs=[q_tile, stat],
            scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
                            pltpu.VMEM((bq, head_dim), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((batch, heads, 1, length), jnp.float32)],
        compiler_params=_params(3), interpret=interpret, name="alibi_flash_fwd",
    )(slopes, q, k, v, seg, seg, pos, pos)


def _backward(q, k, v, seg, pos, slopes, out, lse, d_out, interpret, block):
    batch, heads, length, head_dim = q.shape
    kv_heads = k.shape[1]
    group, bq = heads // kv_heads, block or block_size(length)
    bkv, n = bq, length // bq
    scale = 1.0 / math.sqrt(head_dim)
    seg, pos = _as_rows(seg), _as_rows(pos)
    di = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)[:, :, None, :]  # [b, h, 1, s]

    q_tile, kv_tile, rows, stat = _query_major_specs(bq, bkv, head_dim, group)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, bq=bq, bkv=bkv, kv_blocks=n),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(batch, heads, n, n),
            in_specs=[q_tile, kv_tile, kv_tile, *rows, stat, stat, q_tile], out_specs=q_tile,
            scratch_shapes=[pltpu.VMEM((bq, head_dim), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(3), interpret=interpret, name="alibi_flash_dq",
    )(slopes, q, k, v, seg, seg, pos, pos, lse, di, d_out)

    q_tile, kv_tile, rows, stat = _key_major_specs(bq, bkv, head_dim, group, n)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=scale, bq=bq, bkv=bkv, q_blocks=n, group=group),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(batch, kv_heads, n, group * n),
            in_specs=[q_tile, kv_tile, kv_tile, *rows, stat, stat, q_tile], out_specs=[kv_tile, kv_tile],
            scratch_shapes=[pltpu.VMEM((bkv, head_dim), jnp.float32), pltpu.VMEM((bkv, head_dim), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_params(3), interpret=interpret, name="alibi_flash_dkv",
    )(slopes, q, k, v, seg, seg, pos, pos, lse, di, d_out)
    return dq, dk, dv


def _heads_major(x):
    return x.transpose(0, 2, 1, 3)  # [b, s, h, d] ⇄ [b, h, s, d]


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _flash(q, k, v, seg, pos, slopes, interpret, block):
    """In the model's layout [b, s, h, d], so that the residual `out` is the very array the decoder names
    `attn_out` (one buffer under the save_qkv_out policy, not two layouts of it)."""
    return _flash_fwd(q, k, v, seg, pos, slopes, interpret, block)[0]


def _flash_fwd(q, k, v, seg, pos, slopes, interpret, block):
    out, lse = _forward(_heads_major(q), _heads_major(k), _heads_major(v), seg, pos, slopes, interpret, block)
    out, lse = checkpoint_name(_heads_major(out), RESIDUAL_NAME), checkpoint_name(lse, RESIDUAL_NAME)
    return out, (q, k, v, seg, pos, slopes, out, lse)


def _flash_bwd(interpret, block, residuals, d_out):
    q, k, v, seg, pos, slopes, out, lse = residuals
    dq, dk, dv = _backward(*map(_heads_major, (q, k, v)), seg, pos, slopes, _heads_major(out), lse,
                           _heads_major(d_out), interpret, block)
    return _heads_major(dq), _heads_major(dk), _heads_major(dv), None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _local(q, k, v, segment_ids, positions, slopes, *, interpret, block):
    return _flash(q, k, v, segment_ids.astype(jnp.int32), positions.astype(jnp.int32),
                  slopes.astype(jnp.float32), interpret, block)


def attention(q, k, v, segment_ids, positions, slopes, *, interpret: bool | None = None,
              block: int | None = None) -> jax.Array:
    """Causal ALiBi flash attention within segments; sharded over the mesh in context, if any.
    block: the tile (rows of q and of k/v), default `block_size(len)`; must divide the length."""
    if interpret is None:
        interpret = sharded.platform() != "tpu"
    body = functools.partial(_local, interpret=interpret, block=block)
    return sharded.call(body, q, k, v, segment_ids, positions, per_head=(jnp.asarray(slopes, jnp.float32),))
