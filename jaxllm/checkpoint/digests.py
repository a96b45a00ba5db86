"""Digests of saved arrays, so that a damaged checkpoint is detected instead of restored.

The digest of an array is two 32-bit lanes over its words w_i (the bits of each element, 8- and 16-bit
elements widened to 32) at flat positions i:

    h_i = fmix32(w_i ^ (i · 0x9E3779B1 + 0x85EBCA77))     lane 1 = Σ h_i             mod 2^32
                                                          lane 2 = Σ h_i · (i | 1)   mod 2^32

fmix32 (MurmurHash3's finaliser) is a bijection and the weights are odd, so a change of one word always
changes both lanes; a change of several cancels in both with probability about 2^-64; a word moved to
another position changes its term. It is not a cryptographic hash: it detects accidental damage, not
tampering.

A sum does not depend on the order of its terms, so the same digest comes from
  - `device_digests`: one jitted reduction over (sharded) jax arrays, which every host of a multi-host run
    computes together and receives whole; no array leaves its devices;
  - `HostDigest`: numpy, a block of rows at a time (as `save_params` writes a layer-stacked leaf and
    `open_arrays` reads one).
"""
from __future__ import annotations

import functools

import numpy as np

_GOLDEN, _OFFSET = 0x9E3779B1, 0x85EBCA77
_CHUNK = 1 << 18  # elements hashed at once on the host (a chunk and its temporaries stay in cache)
_MASK = 0xFFFFFFFF


def supported(dtype) -> bool:
    """Whether arrays of `dtype` get a digest (booleans and 1-, 2- and 4-byte numbers)."""
    try:
        dtype = np.dtype(dtype)
    except TypeError:  # e.g. a PRNG key array
        return False
    return dtype == np.bool_ or (dtype.kind in "iufV" and dtype.itemsize in (1, 2, 4))


def encode(lanes) -> str:
    """The two lanes as 16 hex digits (how checkpoints record them)."""
    return f"{int(lanes[0]) & _MASK:08x}{int(lanes[1]) & _MASK:08x}"


# ----------------------------------------------------------------------------------------- host (numpy)

def _fmix_np(h: np.ndarray) -> np.ndarray:
    h ^= h >> np.uint32(16)
    h *= np.uint32(0x85EBCA6B)
    h ^= h >> np.uint32(13)
    h *= np.uint32(0xC2B2AE35)
    h ^= h >> np.uint32(16)
    return h


def _words_np(block: np.ndarray) -> np.ndarray:
    flat = np.ascontiguousarray(block).reshape(-1)
    if flat.dtype == np.bool_:
        return flat.view(np.uint8).astype(np.uint32)
    return flat.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[flat.dtype.itemsize]).astype(np.uint32)


@functools.lru_cache(maxsize=1)
def _iota() -> tuple[np.ndarray, np.ndarray]:
    iota = np.arange(_CHUNK, dtype=np.uint32)
    return iota, iota * np.uint32(_GOLDEN)


def _chunk_lanes(words: np.ndarray, start: int) -> tuple[int, int]:
    """Lane sums of at most _CHUNK words at flat positions start, start + 1, … (mod 2^32, as on device)."""
    iota, golden = _iota()
    n = words.size
    h = words ^ (golden[:n] + np.uint32((start * _GOLDEN + _OFFSET) & _MASK))
    _fmix_np(h)
    lane1 = int(h.sum(dtype=np.uint64))
    weight = iota[:n] + np.uint32(start & _MASK)
    weight |= np.uint32(1)
    h *= weight
    return lane1, int(h.sum(dtype=np.uint64))


def _lanes_np(words: np.ndarray, start: int) -> tuple[int, int]:
    """Lane sums of `words` at flat positions start, start + 1, … (chunks in parallel: numpy releases the
    GIL)."""
    starts = range(0, words.size, _CHUNK)
    parts = [(words[at:at + _CHUNK], start + at) for at in starts]
    if len(parts) > 4:
        results = list(_pool().map(lambda part: _chunk_lanes(*part), parts))
    else:
        results = [_chunk_lanes(*part) for part in parts]
    return sum(r[0] for r in results) & _MASK, sum(r[1] for r in results) & _MASK


@functools.lru_cache(maxsize=1)
def _pool():
    import concurrent.futures
    import os

    return concurrent.futures.ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1)),
                                                 thread_name_prefix="jaxllm-digest")


class HostDigest:
    """The digest of one array of `shape`, fed a block of rows (along axis 0) at a time in any order.

    `update(index, block)` takes the index `save_params` writes a block at: an int (one row of a stacked
    leaf), a slice along axis 0, or `slice(None)` / `()` for the whole array. `value()` is the digest once
    every row was fed exactly once, else None."""

    def __init__(self, shape, dtype):
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self._rows = self.shape[0] if self.shape else 1
        self._row_size = int(np.prod(self.shape[1:], dtype=np.int64)) if self.shape else 1
        self._seen = np.zeros(self._rows, np.uint8)
        self._lanes = [0, 0]

    def update(self, index, block: np.ndarray) -> None:
        start, stop = self._rows_of(index)
        block = np.asarray(block)
        if block.size != (stop - start) * self._row_size or block.dtype != self.dtype:
            raise ValueError(f"block {index} of shape {block.shape} {block.dtype} does not fit {self.shape} "
                             f"{self.dtype}")
        self._seen[start:stop] += 1
        lane1, lane2 = _lanes_np(_words_np(block), start * self._row_size)
        self._lanes[0] += lane1
        self._lanes[1] += lane2

    def covered(self, index) -> bool:
        """Whether any row of the block at `index` was fed already."""
        start, stop = self._rows_of(index)
        return bool(self._seen[start:stop].any())

    @property
    def complete(self) -> bool:
        return bool(np.all(self._seen == 1))

    def _rows_of(self, index) -> tuple[int, int]:
        if index == () or (isinstance(index, slice) and index == slice(None)):
            return 0, self._rows
        if isinstance(index, (int, np.integer)):
            return int(index), int(index) + 1
        if isinstance(index, slice) and index.step in (None, 1):
            start, stop, _ = index.indices(self._rows)
            return start, stop
        raise ValueError(f"cannot digest a block at {index!r}: blocks must be rows of axis 0")

    def value(self) -> str | None:
        if not supported(self.dtype) or not np.all(self._seen == 1):
            return None
        return encode(self._lanes)


def host_digest(array) -> str | None:
    """The digest of a whole host array (None for an unsupported dtype)."""
    array = np.asarray(array)
    if not supported(array.dtype):
        return None
    digest = HostDigest(array.shape, array.dtype)
    digest.update(slice(None), array)
    return digest.value()


# ----------------------------------------------------------------------------------------- device (jax)

def _lanes_jnp(x):
    import jax
    import jax.numpy as jnp

    u32 = jnp.uint32
    if x.dtype == jnp.bool_:
        words = x.astype(u32)
    else:
        words = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: u32}[x.dtype.itemsize]).astype(u32)
    # The flat index from one iota per axis, so a sharded array is never reshaped (gathered).
    index, stride = jnp.zeros(x.shape, u32), 1
    for axis in reversed(range(x.ndim)):
        index = index + jax.lax.broadcasted_iota(u32, x.shape, axis) * u32(stride & _MASK)
        stride *= x.shape[axis]

    def fmix(h):
        h = h ^ (h >> 16)
        h = h * u32(0x85EBCA6B)
        h = h ^ (h >> 13)
        h = h * u32(0xC2B2AE35)
        return h ^ (h >> 16)

    h = fmix(words ^ (index * u32(_GOLDEN) + u32(_OFFSET)))
    return jnp.stack([jnp.sum(h, dtype=u32), jnp.sum(h * (index | u32(1)), dtype=u32)])


@functools.lru_cache(maxsize=32)
def _digest_fn(out_sharding):
    import jax
    import jax.numpy as jnp

    def digests(leaves):
        return jnp.stack([_lanes_jnp(x) for x in leaves]) if leaves else jnp.zeros((0, 2), jnp.uint32)
    return jax.jit(digests, out_shardings=out_sharding)


def device_digests(tree) -> dict[str, str]:
    """{"a/b/c": digest} for every leaf of a pytree of jax arrays with a supported dtype, computed where
    the arrays live (one jitted reduction; on a multi-host mesh every process must call it)."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    leaves = [(path_name(path), leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
              if supported(leaf.dtype)]
    if not leaves:
        return {}
    sharding = getattr(leaves[0][1], "sharding", None)
    out = NamedSharding(sharding.mesh, PartitionSpec()) if isinstance(sharding, NamedSharding) else None
    result = _digest_fn(out)([leaf for _, leaf in leaves])
    # Replicated: every process holds the whole (tiny) result, though not every device of a multi-host mesh.
    lanes = np.asarray(result if result.is_fully_addressable else result.addressable_data(0))
    return {name: encode(row) for (name, _), row in zip(leaves, lanes)}


def path_name(path) -> str:
    """'layers/attn/wq' for a jax tree path (dict keys, sequence indices, attribute names)."""
    parts = []
    for key in path:
        for attribute in ("key", "idx", "name"):
            if hasattr(key, attribute):
                parts.append(str(getattr(key, attribute)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def compare(recorded: dict[str, str], actual: dict[str, str]) -> list[str]:
    """Names whose digest differs from the one recorded (a recorded leaf that is missing counts too)."""
    return [name for name, digest in recorded.items() if actual.get(name) != digest]
