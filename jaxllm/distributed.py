"""Moving values between hosts and global arrays, the same code on one process or on many.

Under `jax.distributed` every process runs the same program: a global `jax.Array` spans every host's
devices and each process holds only its shards. These helpers are the two crossings: host numpy (the same
on every process) onto a mesh, and a global array back to numpy on every process.
"""
from __future__ import annotations

import jax
import numpy as np


def is_primary() -> bool:
    """True on the process that writes shared files (metrics, outputs) and prints results."""
    return jax.process_index() == 0


def to_host(x) -> np.ndarray:
    """numpy copy of an array on every process: a local or fully replicated array is read in place; one
    sharded over several processes is all-gathered (a collective: every process must call it)."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def put(tree, shardings):
    """Global arrays from host numpy that is identical on every process (a pytree, and shardings as one
    sharding or a matching tree); each process copies in only the slices its own devices hold."""
    def one(x, sharding):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: one(x, shardings), tree)
    return jax.tree.map(one, tree, shardings)


def sync(name: str) -> None:
    """Wait until every process reaches this point (no-op on one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)
