"""Per-chip temporaries of ONE attention layer's forward + backward, einsum against the fused TPU kernels, by
compiling for a TPU slice this machine does not have (libtpu's compile-only topology, as the pre-flight does).

    python bench/attention_memory.py                   # Llama-2-7B: 4 rows x 4096 tokens, 32 heads of 128, bf16, v5p:2x2x1
    python bench/attention_memory.py --topology v5p-8 --batch 8 --seq-len 2048 --kv-heads 8

The program is `grad(sum(attend(q, k, v)))` with respect to q, k and v (the projections are not part of it),
batch sharded over the mesh's fsdp axis (one row per chip), heads over `--tensor`. Rows:

    einsum          model.attention=reference: materialises float32 [batch, heads, q, kv] scores and probabilities
    einsum + ALiBi  the same with the [batch, q, kv] distance and the per-head bias (Baichuan-13B's path)
    splash          model.attention=splash on a RoPE model: JAX's Pallas splash kernel
    alibi_flash     model.attention=splash on an ALiBi model: jaxllm's Pallas ALiBi flash kernel

`temporaries` is XLA's `memory_analysis().temp_size_in_bytes` for one chip; ratios are against `einsum`
compiled in the same run.
"""
from __future__ import annotations

import argparse
import time


def compile_attention(devices, *, batch, seq_len, heads, kv_heads, head_dim, tensor, impl, alibi, dtype="bfloat16"):
    """The compiled forward + backward of one attention call on `devices`; returns (compiled, seconds)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jaxllm import sharding
    from jaxllm.models.attention import alibi_slopes, attend, attention_mask

    mesh = sharding.make_mesh(data=1, fsdp=-1, tensor=tensor, devices=devices)
    q_spec = sharding.logical_to_pspec(("batch", "length", "act_heads", "head_dim"), (batch, seq_len, heads, head_dim), mesh)
    kv_spec = sharding.logical_to_pspec(("batch", "length", "kv_heads", "head_dim"), (batch, seq_len, kv_heads, head_dim), mesh)
    row = NamedSharding(mesh, P(q_spec[0], None))
    q = jax.ShapeDtypeStruct((batch, seq_len, heads, head_dim), dtype, sharding=NamedSharding(mesh, q_spec))
    kv = jax.ShapeDtypeStruct((batch, seq_len, kv_heads, head_dim), dtype, sharding=NamedSharding(mesh, kv_spec))
    ids = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32, sharding=row)
    slopes = jnp.asarray(alibi_slopes(heads)) if alibi else None

    def loss(q, k, v, segment_ids, positions):
        mask = None if impl == "splash" else attention_mask(segment_ids, segment_ids, 0)
        bias = None
        if alibi:
            distance = None if impl == "splash" else (positions[:, None, :] - positions[:, :, None]).astype(jnp.float32)
            bias = (slopes, distance)
        out = attend(q, k, v, mask, alibi=bias, impl=impl, causal=True, segment_ids=segment_ids, positions=positions)
        return jnp.sum(out.astype(jnp.float32))

    step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    start = time.perf_counter()
    with jax.set_mesh(mesh), sharding.axis_rules():
        compiled = step.lower(q, kv, kv, ids, ids).compile()
    return compiled, time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--topology", default="v5p:2x2x1")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=None)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--tensor", type=int, default=1)
    args = parser.parse_args(argv)

    from jaxllm.preflight import topology as topologies
    topologies.hide_absent_tpu()
    topo = topologies.parse(args.topology)
    devices = topo.devices()
    shape = dict(batch=args.batch, seq_len=args.seq_len, heads=args.heads, kv_heads=args.kv_heads or args.heads,
                 head_dim=args.head_dim, tensor=args.tensor)
    print(f"{topo.describe()}; one attention layer fwd+bwd: {args.batch} rows x {args.seq_len} tokens, "
          f"{args.heads} heads ({shape['kv_heads']} KV) of {args.head_dim}, bfloat16, tensor={args.tensor}")
    rows = [("einsum", "reference", False), ("einsum + ALiBi", "reference", True),
            ("splash", "splash", False), ("alibi_flash", "splash", True)]
    results = []
    for label, impl, alibi in rows:
        compiled, seconds = compile_attention(devices, impl=impl, alibi=alibi, **shape)
        memory = compiled.memory_analysis()
        results.append((label, memory.temp_size_in_bytes, memory.argument_size_in_bytes, seconds))
    base = results[0][1]
    print(f"{'path':<16}{'temporaries GiB':>16}{'vs einsum':>11}{'arguments GiB':>15}{'compile s':>11}")
    for label, temp, arguments, seconds in results:
        print(f"{label:<16}{temp / 2**30:>16.3f}{temp / base:>11.3f}{arguments / 2**30:>15.3f}{seconds:>11.1f}")


if __name__ == "__main__":
    main()
