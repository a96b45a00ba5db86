"""What the kernels share: the platform being compiled for, and running a kernel per shard of the mesh.

A Pallas kernel is one program per device, so under a mesh it runs inside `jax.shard_map`: batch and heads
sharded as the rules table (`jaxllm.sharding`, or the `axis_rules` in context) shards the activations,
sequence and head_dim whole on every shard (the kernels do not split a sequence across devices).
"""
from __future__ import annotations

import flax.linen as nn
import jax
from jax.sharding import PartitionSpec as P

from jaxllm import sharding


def platform() -> str:
    """The platform being traced for: the devices of the mesh in context (`jax.set_mesh`), else JAX's
    default backend. A TPU program compiled on a CPU host (pre-flight) gets the TPU choices."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def specs(q_shape, kv_shape, mesh, rules=None) -> tuple[P, P]:
    """PartitionSpecs of q [batch, len, heads, d] and k/v [batch, len, kv_heads, d] on `mesh`. Heads are
    sharded only where q's and the KV heads' shards line up (same mesh axes); otherwise both stay whole."""
    rules = rules or nn.get_logical_axis_rules() or sharding.LOGICAL_RULES
    q_spec = sharding.logical_to_pspec(("batch", "length", "act_heads", "head_dim"), q_shape, mesh, rules)
    kv_spec = sharding.logical_to_pspec(("batch", "length", "kv_heads", "head_dim"), kv_shape, mesh, rules)
    if q_spec[2] != kv_spec[2]:
        q_spec, kv_spec = P(q_spec[0], None, None, None), P(kv_spec[0], None, None, None)
    return q_spec, kv_spec


def call(body, q, k, v, *rows, per_head=()):
    """`body(q, k, v, *rows, *per_head)` on each shard of the mesh in context (or once, without one).

    rows: [batch, len] arrays (segment ids, positions), sharded like q's batch; per_head: [heads] arrays
    (ALiBi slopes), sharded like q's heads."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return body(q, k, v, *rows, *per_head)
    q_spec, kv_spec = specs(q.shape, k.shape, mesh)
    row_spec, head_spec = P(q_spec[0], None), P(q_spec[2])
    in_specs = (q_spec, kv_spec, kv_spec) + (row_spec,) * len(rows) + (head_spec,) * len(per_head)
    return jax.shard_map(body, in_specs=in_specs, out_specs=q_spec, check_vma=False)(q, k, v, *rows, *per_head)
