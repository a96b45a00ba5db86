"""The fused attention kernels (`jaxllm/models/kernels/`) against the einsum reference path: forward and
dq, dk, dv in float32 for causal rows, packed segments, grouped KV heads and ALiBi's interleaved slopes
(Pallas' interpreter on CPU, tiny shapes, several tiles per row); a whole tiny model's loss and gradients;
the kernels under a mesh (shard_map); `auto`'s choice; and the TPU compilation of the sharded kernels."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import sharding
from jaxllm.preflight import topology as topologies
from jaxllm.models import presets
from jaxllm.models.attention import alibi_slopes, attend, attention_mask, choose
from jaxllm.models.decoder import Decoder
from jaxllm.models.kernels import alibi_flash, splash

TOL = dict(rtol=1e-5, atol=1e-5)


def packed_rows(batch, length, lengths):
    """segment_ids and positions of rows packed with documents of `lengths` (the rest padding, segment 0)."""
    seg, pos = np.zeros((batch, length), np.int32), np.zeros((batch, length), np.int32)
    for row in range(batch):
        start = 0
        for doc, size in enumerate(lengths[row % len(lengths)]):
            seg[row, start:start + size], pos[row, start:start + size] = doc + 1, np.arange(size)
            start += size
        pos[row, start:] = np.arange(length - start)
    return jnp.asarray(seg), jnp.asarray(pos)


def reference(q, k, v, seg, pos, slopes):
    alibi = None if slopes is None else (jnp.asarray(slopes), (pos[:, None, :] - pos[:, :, None]).astype(jnp.float32))
    return attend(q, k, v, attention_mask(seg, seg, 0), alibi=alibi, impl="reference")


def check_against_reference(kernel, batch, length, heads, kv_heads, head_dim, lengths, alibi):
    keys = jax.random.split(jax.random.PRNGKey(heads * 7 + length), 4)
    q = jax.random.normal(keys[0], (batch, length, heads, head_dim), jnp.float32)
    k = jax.random.normal(keys[1], (batch, length, kv_heads, head_dim), jnp.float32)
    v = jax.random.normal(keys[2], (batch, length, kv_heads, head_dim), jnp.float32)
    cotangent = jax.random.normal(keys[3], q.shape, jnp.float32)
    seg, pos = packed_rows(batch, length, lengths)
    slopes = alibi_slopes(heads) if alibi else None

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * cotangent)

    fused = lambda q, k, v: kernel(q, k, v, seg, pos, slopes)
    ref = lambda q, k, v: reference(q, k, v, seg, pos, slopes)
    np.testing.assert_allclose(jax.jit(fused)(q, k, v), ref(q, k, v), **TOL)
    grads = jax.jit(jax.grad(loss(fused), argnums=(0, 1, 2)))(q, k, v)
    ref_grads = jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
        np.testing.assert_allclose(got, want, err_msg=name, **TOL)


# (batch, length, heads, kv_heads, head_dim, documents per row, tile)
CASES = {
    "causal": (1, 256, 4, 4, 32, [[256]], 128),
    "packed-gqa-8/2": (2, 256, 8, 2, 32, [[100, 120], [30, 200, 10]], 128),
    "gqa-32/8": (1, 128, 32, 8, 16, [[50, 78]], 128),
}


@pytest.mark.parametrize("case", CASES)
def test_splash_matches_einsum(case):
    batch, length, heads, kv_heads, head_dim, lengths, tile = CASES[case]
    kernel = lambda q, k, v, seg, pos, slopes: splash.attention(q, k, v, seg, block=tile)
    check_against_reference(kernel, batch, length, heads, kv_heads, head_dim, lengths, alibi=False)


ALIBI_CASES = {
    **CASES,
    "packed-gqa-8/2": (2, 256, 8, 2, 32, [[100, 120], [30, 200, 10]], 64),  # 4 x 4 tiles: skipped, partial
    "baichuan-13b-40-heads": (1, 128, 40, 40, 16, [[70, 58]], 64),          # interleaved slopes
}


@pytest.mark.parametrize("case", ALIBI_CASES)
def test_alibi_flash_matches_einsum(case):
    batch, length, heads, kv_heads, head_dim, lengths, tile = ALIBI_CASES[case]
    kernel = lambda q, k, v, seg, pos, slopes: alibi_flash.attention(q, k, v, seg, pos, slopes, block=tile)
    check_against_reference(kernel, batch, length, heads, kv_heads, head_dim, lengths, alibi=True)


def test_alibi_offsets_are_the_einsum_bias():
    """The kernel's bias is slope · (pos_k − pos_q) from the packing pipeline's positions, not from slots:
    positions that restart inside a segment (so pos_k − pos_q ≠ slot difference) must still match."""
    seg = jnp.ones((1, 128), jnp.int32)
    pos = jnp.asarray(np.concatenate([np.arange(64), np.arange(64) * 3])[None], jnp.int32)
    keys = jax.random.split(jax.random.PRNGKey(3), 3)
    q, k, v = (jax.random.normal(key, (1, 128, 4, 16)) for key in keys)
    slopes = alibi_slopes(4)
    np.testing.assert_allclose(alibi_flash.attention(q, k, v, seg, pos, slopes, block=64),
                               reference(q, k, v, seg, pos, slopes), **TOL)


def test_alibi_flash_in_bfloat16_is_close_to_einsum():
    """bfloat16 operands (float32 statistics and accumulators in the kernel) stay at bfloat16's precision."""
    seg, pos = packed_rows(1, 128, [[40, 88]])
    keys = jax.random.split(jax.random.PRNGKey(9), 4)
    q = jax.random.normal(keys[0], (1, 128, 4, 32)).astype(jnp.bfloat16)
    k, v = (jax.random.normal(key, (1, 128, 2, 32)).astype(jnp.bfloat16) for key in keys[1:3])
    cotangent = jax.random.normal(keys[3], q.shape)
    slopes = alibi_slopes(4)
    loss = lambda fn: (lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * cotangent))
    fused = lambda q, k, v: alibi_flash.attention(q, k, v, seg, pos, slopes, block=64)
    ref = lambda q, k, v: reference(q, k, v, seg, pos, slopes)
    got = jax.jit(jax.value_and_grad(loss(fused), argnums=(0, 1, 2)))(q, k, v)
    want = jax.value_and_grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
    np.testing.assert_allclose(jax.jit(fused)(q, k, v).astype(np.float32), ref(q, k, v).astype(np.float32), atol=2e-2)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        scale = float(jnp.max(jnp.abs(b.astype(jnp.float32))))
        np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), atol=2e-2 * scale)


@pytest.mark.parametrize("preset,remat", [("llama2-tiny", "save_qkv_out"), ("baichuan-13b-tiny", "full")])
def test_tiny_model_loss_and_grads_match_reference(preset, remat):
    """attention=splash (splash for RoPE, the ALiBi kernel for ALiBi) gives the reference's loss and
    gradients, under remat policies that keep (save_qkv_out) or recompute (full) the kernels' residuals."""
    cfg = presets.get_preset(preset, remat=remat)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (1, 128), 0, cfg.vocab_size)
    seg, pos = packed_rows(1, 128, [[50, 70]])
    params = Decoder(cfg).init(jax.random.PRNGKey(0), tokens[:, :8])

    def loss(params, impl):
        logits = Decoder(cfg.replace(attention=impl)).apply(params, tokens, pos, seg)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tokens[..., None], -1)[..., 0])

    want_loss, want = jax.value_and_grad(loss)(params, "reference")
    got_loss, got = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, "splash")
    np.testing.assert_allclose(got_loss, want_loss, **TOL)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), got, want)


def test_kernels_per_shard_under_a_mesh():
    """Under a (data, fsdp, tensor) mesh the kernels run per shard (batch over data x fsdp, heads and KV
    heads over tensor) and still equal the einsum path."""
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    seg, pos = packed_rows(4, 128, [[60, 68], [128]])
    keys = jax.random.split(jax.random.PRNGKey(5), 3)
    q = jax.random.normal(keys[0], (4, 128, 4, 16))
    k, v = (jax.random.normal(key, (4, 128, 2, 16)) for key in keys[1:])
    slopes = alibi_slopes(4)
    with jax.set_mesh(mesh), sharding.axis_rules():
        lowered = jax.jit(lambda q, k, v: splash.attention(q, k, v, seg)).lower(q, k, v)
        assert "shard_map" in str(lowered.as_text()) or "manual" in lowered.as_text()
        got_splash = jax.jit(lambda q, k, v: splash.attention(q, k, v, seg))(q, k, v)
        got_alibi = jax.jit(lambda q, k, v: alibi_flash.attention(q, k, v, seg, pos, slopes, block=64))(q, k, v)
    np.testing.assert_allclose(got_splash, reference(q, k, v, seg, pos, None), **TOL)
    np.testing.assert_allclose(got_alibi, reference(q, k, v, seg, pos, slopes), **TOL)


def test_a_forced_kernel_leaves_the_parameter_shapes_alone():
    # the shapes come from a length-1 dummy forward, which splash cannot tile: `jaxllm train … attention=splash`
    import dataclasses

    from jaxllm.models import param_logical_axes, param_shapes

    cfg = presets.get_preset("llama2-tiny")
    forced = dataclasses.replace(cfg, attention="splash")
    assert param_shapes(forced) == param_shapes(cfg) and param_logical_axes(forced) == param_logical_axes(cfg)


def test_auto_chooses_by_the_mesh_devices():
    assert choose("auto", "rope", jnp.bfloat16, True, 256, 256, 64) == "reference"  # CPU host, no mesh
    assert choose("splash", "alibi", jnp.float32, True, 256, 256, 64) == "splash"
    assert choose("splash", "rope", jnp.float32, False, 1, 256, 64) == "reference"  # a KV cache: einsum
    with pytest.raises(ValueError, match="multiple of 128"):
        choose("splash", "rope", jnp.float32, True, 100, 100, 64)
    try:
        devices = topologies.parse("v5p:2x2x1").devices()
    except topologies.TopologyError as err:
        pytest.skip(f"the TPU compiler cannot load here: {err}")
    with jax.set_mesh(sharding.make_mesh(fsdp=-1, devices=devices)):
        # The suite runs at "highest" matmul precision, which splash cannot honour in bfloat16 on TPU.
        assert choose("auto", "rope", jnp.bfloat16, True, 256, 256, 64) == "reference"
        assert choose("auto", "rope", jnp.float32, True, 256, 256, 64) == "splash"
        with jax.default_matmul_precision("default"):
            assert choose("auto", "rope", jnp.bfloat16, True, 256, 256, 64) == "splash"
        assert choose("auto", "alibi", jnp.bfloat16, True, 4096, 4096, 128) == "splash"
        assert choose("auto", "rope", jnp.bfloat16, True, 100, 100, 64) == "reference"
        assert choose("auto", "rope", jnp.bfloat16, False, 1, 4096, 64) == "reference"


@pytest.mark.parametrize("alibi", [False, True], ids=["splash", "alibi_flash"])
def test_sharded_kernels_compile_for_tpu(alibi):
    """Forward + backward of the kernels under a v5p:2x2x1 mesh (fsdp 2 x tensor 2, GQA 8/2 heads of 128)
    lowers through Mosaic and compiles with the TPU compiler: a TPU custom call per kernel, inside the
    shard_map, and less scratch than the einsum path (bench/attention_memory.py measures a 7B layer)."""
    try:
        devices = topologies.parse("v5p:2x2x1").devices()
    except topologies.TopologyError as err:
        pytest.skip(f"the TPU compiler cannot load here: {err}")
    mesh = sharding.make_mesh(fsdp=2, tensor=2, devices=devices)
    q_spec = sharding.logical_to_pspec(("batch", "length", "act_heads", "head_dim"), (2, 512, 8, 128), mesh)
    kv_spec = sharding.logical_to_pspec(("batch", "length", "kv_heads", "head_dim"), (2, 512, 2, 128), mesh)
    assert q_spec == kv_spec == jax.sharding.PartitionSpec("fsdp", None, "tensor", None)
    named = lambda spec: jax.sharding.NamedSharding(mesh, spec)
    q = jax.ShapeDtypeStruct((2, 512, 8, 128), jnp.bfloat16, sharding=named(q_spec))
    kv = jax.ShapeDtypeStruct((2, 512, 2, 128), jnp.bfloat16, sharding=named(kv_spec))
    ids = jax.ShapeDtypeStruct((2, 512), jnp.int32, sharding=named(jax.sharding.PartitionSpec("fsdp", None)))
    slopes = jnp.asarray(alibi_slopes(8))

    def loss(q, k, v, seg, pos, impl):
        mask = None if impl == "splash" else attention_mask(seg, seg, 0)
        bias = (slopes, None) if alibi else None
        out = attend(q, k, v, mask, alibi=bias, impl=impl, causal=True, segment_ids=seg, positions=pos)
        return jnp.sum(out.astype(jnp.float32))

    temporaries = {}
    # The suite's "highest" matmul precision would ask Mosaic for float32 passes on splash's bfloat16 tiles.
    with jax.set_mesh(mesh), sharding.axis_rules(), jax.default_matmul_precision("default"):
        for impl in ("reference", "splash"):
            step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=5)
            compiled = step.lower(q, kv, kv, ids, ids, impl).compile()
            temporaries[impl] = compiled.memory_analysis().temp_size_in_bytes
            if impl == "splash":
                assert compiled.as_text().count("tpu_custom_call") >= 3  # forward, dq, dkv
    assert temporaries["splash"] < temporaries["reference"]
