"""Mesh construction and the one table from logical axis names to mesh axes.

Model code names logical axes only ('embed', 'heads', ...); changing parallelism means changing the
mesh shape or this table, never the model.
"""
from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or axes). Parameters are FSDP-sharded on `embed` and tensor-parallel on
# heads/mlp/vocab; activations shard their batch over data x fsdp.
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
    ("lora", None),       # LoRA rank: adapters are small, their other axes follow the weight they adapt
)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all); one size may be -1 (the rest).

    Axes are `AxisType.Auto`: linen's logical constraints need it (Explicit axes reject them).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one of data/fsdp/tensor may be -1, got {sizes}")
    known = math.prod(s for s in sizes if s != -1)
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh: sizes must be positive or -1, got data={data} fsdp={fsdp} tensor={tensor}")
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh: {len(devices)} devices are not divisible by {known} "
                             f"(data={data} fsdp={fsdp} tensor={tensor})")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh: data*fsdp*tensor = {math.prod(sizes)} but {len(devices)} devices "
                         f"are available (data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]})")
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    if slices > 1:  # multi-slice: data parallelism crosses the slices (data-centre network), the rest stays inside
        if sizes[0] % slices:
            raise ValueError(f"mesh: data={sizes[0]} must be a multiple of the {slices} slices (data parallelism "
                             f"spans the slices): set mesh.data={slices}")
        from jax.experimental import mesh_utils
        grid = mesh_utils.create_hybrid_device_mesh([sizes[0] // slices, *sizes[1:]], [slices, 1, 1], devices,
                                                    allow_split_physical_axes=True)
        return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    # jax.make_mesh orders devices by the physical topology (TPU torus, NVLink islands), so the inner
    # axes (tensor, then fsdp) get the fastest links.
    return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def _mesh_axes(name, rules):
    for logical, mesh_axes in rules:
        if logical == name:
            return mesh_axes
    return None


def logical_to_pspec(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                     rules=LOGICAL_RULES) -> P:
    """Mesh PartitionSpec for one array. A dimension not divisible by its mesh axes is replicated
    (e.g. 2 KV heads on tensor=4), and a mesh axis is used at most once per array."""
    used: set[str] = set()
    spec = []
    for name, size in zip(logical, shape):
        axes = _mesh_axes(name, rules) if name else None
        if axes is None:
            spec.append(None)
            continue
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
        while axes and size % math.prod(mesh.shape[a] for a in axes):
            axes = axes[:-1]
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*spec)


def tree_shardings(logical_tree, shape_tree, mesh: Mesh, rules=LOGICAL_RULES):
    """NamedShardings for a pytree, given matching trees of logical specs and shapes/arrays."""
    return jax.tree.map(
        lambda spec, x: NamedSharding(mesh, logical_to_pspec(tuple(spec), x.shape, mesh, rules)),
        logical_tree, shape_tree, is_leaf=lambda s: isinstance(s, P))


def batch_sharding(mesh: Mesh, ndim: int = 2, rules=LOGICAL_RULES) -> NamedSharding:
    """Sharding for a [batch, ...] array: batch over (data, fsdp), the rest replicated."""
    axes = tuple(a for a in (_mesh_axes("batch", rules) or ()) if mesh.shape[a] > 1)
    lead = None if not axes else axes[0] if len(axes) == 1 else axes
    return NamedSharding(mesh, P(lead, *([None] * (ndim - 1))))


def axis_rules(rules=LOGICAL_RULES):
    """Context manager that makes linen's `with_logical_constraint` resolve through our table."""
    return nn.logical_axis_rules(rules)
