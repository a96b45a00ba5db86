"""The one decoder for every family (Flax linen). Family differences are config fields.

Parameter tree (layers stacked on a leading axis, run with `nn.scan`):

    embedding               [vocab, embed]
    layers/attn_norm/scale  [layers, embed]
    layers/attn/wq          [layers, embed, heads, head_dim]
    layers/attn/wk, wv      [layers, embed, kv_heads, head_dim]
    layers/attn/wo          [layers, heads, head_dim, embed]
    layers/mlp_norm/scale   [layers, embed]
    layers/mlp/gate, up     [layers, embed, mlp]
    layers/mlp/down         [layers, mlp, embed]
    final_norm/scale        [embed]
    lm_head                 [embed, vocab]   (absent when embeddings are tied; raw rows for NormHead)
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxllm.config import ModelConfig
from jaxllm.lora import model as lora
from jaxllm.lora import quant
from jaxllm.models.attention import (alibi_slopes, apply_rope, attend, attention_mask, choose, rope_cos_sin,
                                     target_platform)
from jaxllm.models.kv_cache import read_layer, write_layer, write_rows

_REMAT = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_qkv_out": jax.checkpoint_policies.save_only_these_names("query", "key", "value", "attn_out"),
}


def _dense(spec: str, x, w, n_in: int = 1):
    """`einsum(spec, x, w)` contracting x's last `n_in` dims with w's first. On CPU as one 2-D matmul:
    XLA:CPU runs the backward pass of a dot with several batch/contracting dims 2-3x slower. The choice
    follows the devices being compiled for (`target_platform`), not the host's."""
    if target_platform() != "cpu":
        return jnp.einsum(spec, x, w)
    lead, size = x.shape[:x.ndim - n_in], math.prod(w.shape[:n_in])
    return (x.reshape(-1, size) @ w.reshape(size, -1)).reshape(*lead, *w.shape[n_in:])


def _project(module, name: str, spec: str, x, w, n_in: int = 1, shared=None, layer=None):
    """`_dense` with weight `name`: cast (or dequantized, for a quantized frozen base) to the compute dtype,
    plus its LoRA adapter when the config has one (`jaxllm.lora.model`); `layer`: this layer's index (per-layer
    adapter scales)."""
    out = _dense(spec, x, quant.dequantize(w, module.config.dtype), n_in)
    return lora.adapt(module, name, x, out, out.ndim - (x.ndim - n_in), n_in, _dense, shared, layer)


def _param(module, name, axes, shape, init, dtype):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


class RMSNorm(nn.Module):
    eps: float
    dtype: str
    param_dtype: str

    @nn.compact
    def __call__(self, x):
        scale = _param(self, "scale", ("norm",), (x.shape[-1],), nn.initializers.ones, self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * normed.astype(self.dtype)


class Attention(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x, positions, mask, alibi_distance, cache_index, cache, segment_ids=None, layer=None):
        """mask, alibi_distance: None where a fused kernel attends (it takes segment_ids and positions).
        cache: None, or {"k", "v": the whole cache [layers, batch, kv_heads, max_len, head_dim], "layer":
        this layer's index}; the new keys and values are written into it at `cache_index`."""
        cfg = self.config
        dt, pdt = cfg.dtype, cfg.param_dtype
        init = nn.initializers.normal(cfg.initializer_range)
        h, n, kv, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        wq = _param(self, "wq", ("embed", "heads", "head_dim"), (h, n, d), init, pdt)
        wk = _param(self, "wk", ("embed", "kv_heads", "head_dim"), (h, kv, d), init, pdt)
        wv = _param(self, "wv", ("embed", "kv_heads", "head_dim"), (h, kv, d), init, pdt)
        wo = _param(self, "wo", ("heads", "head_dim", "embed"), (n, d, h), init, pdt)

        shared = lora.shared_input(self, x, _dense)  # the W_pack adapter's dropout(x)·A, for q, k and v
        q = _project(self, "wq", "bte,ehd->bthd", x, wq, shared=shared, layer=layer)
        k = _project(self, "wk", "bte,ehd->bthd", x, wk, shared=shared, layer=layer)
        v = _project(self, "wv", "bte,ehd->bthd", x, wv, shared=shared, layer=layer)
        q = nn.with_logical_constraint(q, ("batch", "length", "act_heads", "head_dim"))
        if cfg.position == "rope":
            cos, sin = rope_cos_sin(positions, d, cfg.rope_theta)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q = checkpoint_name(q, "query")
        k = checkpoint_name(k, "key")
        v = checkpoint_name(v, "value")

        if cache is not None:
            layer = cache["layer"]
            cache = {**cache, "k": write_layer(cache["k"], k, layer, cache_index),
                     "v": write_layer(cache["v"], v, layer, cache_index)}
            k, v = read_layer(cache["k"], layer).astype(dt), read_layer(cache["v"], layer).astype(dt)  # [batch, kv_heads, max_len, head_dim]

        alibi = None
        if cfg.position == "alibi":
            alibi = (jnp.asarray(alibi_slopes(n)), alibi_distance)
        out = attend(q, k, v, mask, alibi=alibi, impl=cfg.attention, causal=cache is None,
                     kv_heads_first=cache is not None, segment_ids=segment_ids, positions=positions)
        out = checkpoint_name(out, "attn_out")
        return _project(self, "wo", "bthd,hde->bte", out, wo, n_in=2, layer=layer), cache


class MLP(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x, layer=None):
        cfg = self.config
        init = nn.initializers.normal(cfg.initializer_range)
        shape_in = (cfg.hidden_size, cfg.intermediate_size)
        gate = _param(self, "gate", ("embed", "mlp"), shape_in, init, cfg.param_dtype)
        up = _param(self, "up", ("embed", "mlp"), shape_in, init, cfg.param_dtype)
        down = _param(self, "down", ("mlp", "embed"), shape_in[::-1], init, cfg.param_dtype)
        gated = nn.silu(_project(self, "gate", "bte,ef->btf", x, gate, layer=layer))
        hidden = gated * _project(self, "up", "bte,ef->btf", x, up, layer=layer)
        hidden = nn.with_logical_constraint(hidden, ("batch", "length", "act_mlp"))
        return _project(self, "down", "btf,fe->bte", hidden, down, layer=layer)


class Block(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, carry, positions, mask, alibi_distance, cache_index, segment_ids, layer):
        """carry: (hidden states, the KV cache or None). The cache is carried through the layer scan, not
        scanned over, so each layer updates it in place instead of the scan rebuilding it every step.
        layer: this layer's index (scanned over), for per-layer adapter scales."""
        cfg = self.config
        x, kv = carry
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name=name)
        attn_out, kv = Attention(cfg, name="attn")(norm("attn_norm")(x), positions, mask, alibi_distance,
                                                   cache_index, kv, segment_ids, layer)
        x = x + attn_out
        x = x + MLP(cfg, name="mlp")(norm("mlp_norm")(x), layer)
        if kv is not None:
            kv = {**kv, "layer": kv["layer"] + 1}
        return (nn.with_logical_constraint(x, ("batch", "length", "act_embed")), kv), None


class Decoder(nn.Module):
    """tokens int32[batch, len] → logits float32[batch, len, vocab] (or final hidden states).

    unrolled: the layers as separate modules `blocks_0` … (parameters in `jaxllm.models.unroll_layers`'s
    layout, a Python loop) instead of one `nn.scan` over layer-stacked weights: decoding on CPU, where
    XLA copies each layer's slice of a stacked weight before its matmul, every step."""

    config: ModelConfig
    unrolled: bool = False

    def setup(self):
        cfg = self.config
        block = Block
        if cfg.remat != "none":
            block = nn.remat(Block, policy=_REMAT[cfg.remat], prevent_cse=False)
        if self.unrolled:
            self.blocks = [Block(cfg) for _ in range(cfg.num_layers)]
            return self._setup_ends()
        self.layers = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast,) * 5 + (0,),
            length=cfg.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, name="layers")
        self._setup_ends()

    def _setup_ends(self):
        cfg = self.config
        init = nn.initializers.normal(cfg.initializer_range)
        self.embedding = self.param(
            "embedding", nn.with_logical_partitioning(init, ("vocab", "embed")),
            (cfg.vocab_size, cfg.hidden_size), cfg.param_dtype)
        self.final_norm = RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype)
        if not cfg.tie_embeddings and cfg.head == "lm":
            self.lm_head = self.param(
                "lm_head", nn.with_logical_partitioning(init, ("embed", "vocab")),
                (cfg.hidden_size, cfg.vocab_size), cfg.param_dtype)

    def __call__(self, tokens, positions=None, segment_ids=None, kv_cache=None, *,
                 return_hidden: bool = False, last_only: bool = False):
        """Returns logits (or hidden states), and the updated cache when `kv_cache` is given.

        positions: int32[batch, len], default counting from the cache index. segment_ids:
        int32[batch, len], tokens attend only within their segment (>= 1; 0 marks padding).
        kv_cache: dict from `init_kv_cache`; the new tokens are written at its `index` (a scalar, or
        int32[batch]: each row at its own slot, positions then counting from each row's index).
        last_only: the output for the last position only ([batch, 1, ...]): a prefill needs no more,
        and the LM head over every prompt token is most of its work in a small model.
        """
        cfg = self.config
        batch, length = tokens.shape
        index = jnp.int32(0) if kv_cache is None else kv_cache["index"]
        if positions is None:
            positions = index[..., None] + jnp.arange(length, dtype=jnp.int32)  # one index, or one per row
            positions = jnp.broadcast_to(positions, (batch, length))
        if segment_ids is None:
            segment_ids = jnp.ones((batch, length), jnp.int32)

        if kv_cache is None:
            kv_segments, kv_positions, kv = segment_ids, positions, None
        else:
            kv_segments = write_rows(kv_cache["segment_ids"], segment_ids, index)
            kv_positions = write_rows(kv_cache["positions"], positions, index)
            if isinstance(kv_cache["k"], tuple) != self.unrolled:
                raise ValueError("a per-layer KV cache goes with per-layer parameters (unroll_layers), a "
                                 "stacked one with stacked parameters")
            # The layer index: a Python int through the unrolled loop (static slices of the cache tuple).
            kv = {"k": kv_cache["k"], "v": kv_cache["v"], "layer": 0 if self.unrolled else jnp.int32(0)}
        # A fused kernel (attention=splash, or auto on TPU) builds its mask and ALiBi bias tile by tile.
        fused = choose(cfg.attention, cfg.position, cfg.dtype, kv_cache is None, length, length,
                       cfg.head_dim) == "splash"
        mask = None if fused else attention_mask(segment_ids, kv_segments, index)
        distance = None
        if cfg.position == "alibi" and not fused:
            distance = (kv_positions[:, None, :] - positions[:, :, None]).astype(jnp.float32)

        x = jnp.take(self.embedding, tokens, axis=0).astype(cfg.dtype)
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        if self.unrolled:
            for i, block in enumerate(self.blocks):
                (x, kv), _ = block((x, kv), positions, mask, distance, index, segment_ids, i)
        else:
            layer = jnp.arange(cfg.num_layers, dtype=jnp.int32)
            (x, kv), _ = self.layers((x, kv), positions, mask, distance, index, segment_ids, layer)
        if last_only:
            x = x[:, -1:]
        x = self.final_norm(x)
        out = x if return_hidden or cfg.head == "none" else self.head_logits(x)
        if kv_cache is None:
            return out
        new_cache = {"k": kv["k"], "v": kv["v"], "segment_ids": kv_segments, "positions": kv_positions,
                     "index": index + length}
        return out, new_cache

    def head_logits(self, x, matrix=None) -> jax.Array:
        """float32 logits [batch, len, vocab] of final (normed) hidden states."""
        out = _dense("bte,ev->btv", x, self.output_matrix() if matrix is None else matrix)
        return nn.with_logical_constraint(out.astype(jnp.float32), ("batch", "length", "act_vocab"))

    def output_matrix(self) -> jax.Array:
        """[embed, vocab] in the compute dtype. NormHead rows (HF `lm_head.weight[v]`) are unit-normalised
        every call, in float32 from the stored values and cast once to the compute dtype: rounding the
        normalised rows back to a bfloat16 storage dtype first would cost ~2e-3 of relative logit error
        in a float32 evaluation of a bfloat16 release."""
        cfg = self.config
        w = self.embedding.T if cfg.tie_embeddings else self.lm_head
        if cfg.norm_head:
            w32 = w.astype(jnp.float32)
            norm = jnp.sqrt(jnp.sum(w32 * w32, axis=0, keepdims=True))
            return (w32 / jnp.maximum(norm, 1e-12)).astype(cfg.dtype)
        return w.astype(cfg.dtype)
