"""LoRA adapters on disk, and the frozen base they adapt.

A jaxllm adapter checkpoint is a jaxllm checkpoint directory (`jaxllm.checkpoint`) whose parameters are
only what a LoRA run trains:

    DIR/model.json      the adapted ModelConfig: the base architecture plus `lora` (rank, alpha, dropout, targets)
    DIR/adapter.json    {"base": path of the base checkpoint, "base_digest": its digest or null,
                         "train": base weights trained too (embedding, lm_head, norms), "lm_path": [] or ["backbone"],
                         "base_name": the base's HF path or name, when known (PEFT's base_model_name_or_path)}
    DIR/<step>/params/  every `*_lora_a` / `*_lora_b` leaf, and the base weights named in `train`

RUN/checkpoints of a LoRA run is one (plus optimizer state and the rest); `jaxllm convert` imports PEFT
adapters into one. The base digest is a checksum of the base's values rounded to bfloat16, computed on the
devices as the base is read (sharding- and dtype-independent), so a run refuses to resume on another base.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import checkpoint as jckpt, storage
from jaxllm.config import ModelConfig

ADAPTER_JSON = "adapter.json"


# ---------------------------------------------------------------------------------------------------------
# The record and the digest.

def write_record(directory: str | os.PathLike, *, base: str | None, base_digest: str | None, train=(),
                 lm_path=(), base_name: str | None = None, peft_dtype: str | None = None) -> None:
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    record = {"format": "jaxllm-lora", "base": None if base is None else str(Path(base).absolute()),
              "base_digest": base_digest, "train": list(train), "lm_path": list(lm_path)}
    if base_name is not None:  # the base's HF path or hub name (PEFT's base_model_name_or_path)
        record["base_name"] = base_name
    if peft_dtype is not None:  # an imported PEFT adapter's tensor dtype, which its export writes back
        record["peft_dtype"] = peft_dtype
    tmp = path / (ADAPTER_JSON + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path / ADAPTER_JSON)


def read_record(directory: str | os.PathLike) -> dict | None:
    """adapter.json of a jaxllm adapter checkpoint (or a run directory holding one), or None."""
    path = storage.path(directory)
    for candidate in (path / ADAPTER_JSON, path / "checkpoints" / ADAPTER_JSON):
        if storage.is_file(candidate):
            try:
                return json.loads(candidate.read_text())
            except json.JSONDecodeError as err:
                raise jckpt.CheckpointError(f"{candidate}: invalid JSON ({err.msg})") from None
    return None


@jax.jit
def _checksum(x: jax.Array) -> jax.Array:
    """uint32 Σ bits(bf16(x_i))·(odd weight of i) mod 2^32: exact integer arithmetic, so the same however
    the array is sharded, and any single changed value changes it."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16).astype(jnp.uint32)
    index = jax.lax.iota(jnp.uint32, x.size).reshape(x.shape)
    return jnp.sum(bits * (index * jnp.uint32(2654435761) + jnp.uint32(1) | jnp.uint32(1)), dtype=jnp.uint32)


def checksum(x) -> int:
    return int(_checksum(x))


def digest(checksums: dict[tuple[str, ...], tuple[tuple[int, ...], int]]) -> str:
    """The base digest from {leaf path: (shape, checksum)}."""
    h = hashlib.sha256()
    for path in sorted(checksums):
        shape, value = checksums[path]
        h.update(f"{'/'.join(path)}:{list(shape)}:{value};".encode())
    return h.hexdigest()[:32]


def tree_digest(params, skip=()) -> str:
    """The digest of a base parameter tree held in memory (as `read_base` computes it while reading)."""
    from jaxllm.lora.model import leaf_paths

    paths, leaves = leaf_paths(params), jax.tree.leaves(params)
    return digest({p: (tuple(x.shape), checksum(x)) for p, x in zip(paths, leaves) if p[:1] not in skip})


# ---------------------------------------------------------------------------------------------------------
# Reading a base onto the devices, leaf by leaf.

def read_base(directory: str | os.PathLike, config: ModelConfig, wanted: dict):
    """({path: array}, digest): leaves of the base checkpoint at `directory` (paths in its own tree), each
    read straight onto its devices, one leaf at a time so that quantizing never holds two copies of the base.

    wanted: {path: (dtype, sharding, quantize)} with quantize None, "int8" or "int4" (then sharding is the
    quantized value's and the result a `QuantizedWeight`)."""
    from jaxllm.lora import quant
    from jaxllm.models import param_shapes
    from jaxllm.lora.model import WEIGHTS

    directory = jckpt.resolve(directory)
    shapes = param_shapes(config)
    out, sums = {}, {}
    with jckpt.manager(directory) as mngr:
        step = mngr.latest_step()
        if step is None:
            raise jckpt.CheckpointError(f"{directory}: no saved step (an interrupted save leaves none)")
        for path, (dtype, sharding, kind) in wanted.items():
            node = shapes
            for key in path:
                node = node[key]
            item = {}
            _set(item, path, jax.ShapeDtypeStruct(node.shape, jnp.dtype(dtype), sharding=sharding))
            try:
                restored = jckpt.restore_leaves(mngr, step, item)
            except (ValueError, KeyError, FileNotFoundError) as err:
                raise jckpt.CheckpointError(f"{directory}: step {step} has no readable parameter {'/'.join(path)} "
                                            f"for {config.name}: {str(err).splitlines()[0][:200]}") from None
            leaf = restored
            for key in path:
                leaf = leaf[key]
            sums[path] = (tuple(node.shape), checksum(leaf))
            if kind is not None:
                n_in = len(WEIGHTS[path[-1]][1])
                leaf = jax.jit(quant.quantize, static_argnums=(1, 2), donate_argnums=0)(leaf, kind, n_in)
            out[path] = leaf
    return out, digest(sums)


def _set(tree: dict, path, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def nest(flat: dict) -> dict:
    """{path: leaf} → nested dicts."""
    tree: dict = {}
    for path, value in flat.items():
        _set(tree, path, value)
    return tree


# ---------------------------------------------------------------------------------------------------------
# Reading an adapter: a jaxllm adapter checkpoint or a PEFT directory.

def same_shapes(a: ModelConfig, b: ModelConfig) -> bool:
    """Whether two configs have the same parameter tree and shapes (dtypes, remat, names aside)."""
    from jaxllm.models import param_shapes

    sa, sb = param_shapes(a), param_shapes(b)
    return jax.tree.structure(sa) == jax.tree.structure(sb) and all(
        x.shape == y.shape for x, y in zip(jax.tree.leaves(sa), jax.tree.leaves(sb)))


def is_peft_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def trained_shapes(config: ModelConfig, train=()):
    """ShapeDtypeStructs of what an adapter checkpoint of `config` (a language model) holds."""
    from jaxllm.models import param_shapes
    from jaxllm.lora.model import split, trainable_mask

    shapes = param_shapes(config)
    return split(shapes, trainable_mask(shapes, train))[0]


def load_adapter(path: str | os.PathLike, base_config: ModelConfig | None = None, *, reward: bool = False):
    """(adapted config, {path: numpy leaf}, record) of a language-model adapter: a jaxllm adapter checkpoint
    (a LoRA run directory or its checkpoints) or a PEFT directory (adapter_config.json + weights; then
    `base_config`, the architecture it adapts, is needed)."""
    from jaxllm.lora.model import leaf_paths

    path = Path(path)
    if not path.exists():
        raise jckpt.CheckpointError(f"{path}: no such adapter directory")
    if is_peft_dir(path):
        from jaxllm.lora.peft import read_peft

        if base_config is None:
            raise jckpt.CheckpointError(f"{path}: a PEFT adapter needs the base model it adapts")
        config, leaves, train = read_peft(path, base_config)
        from jaxllm.lora.peft import stored_dtype

        base_name = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        return config, leaves, {"base": None, "base_digest": None, "train": train, "lm_path": [],
                                "base_name": base_name, "peft_dtype": stored_dtype(path)}
    directory = jckpt.resolve(path)
    record = read_record(directory)
    config = jckpt.read_model_config(directory)
    if record is None or config.lora is None:
        raise jckpt.CheckpointError(f"{path}: not an adapter (no {ADAPTER_JSON} and adapter_config.json): a LoRA "
                                    f"run directory, its checkpoints, or a PEFT adapter directory is expected")
    if record.get("lm_path") and not reward:
        raise jckpt.CheckpointError(f"{path}: a reward model's adapter ({'/'.join(record['lm_path'])} + head), "
                                    f"not a language model's")
    if reward and list(record.get("lm_path", ())) != ["backbone"]:
        raise jckpt.CheckpointError(f"{path}: a language model's adapter, not a reward model's")
    if base_config is not None and not same_shapes(base_config.replace(lora=None), config.replace(lora=None)):
        raise jckpt.CheckpointError(f"{path}: adapts {config.name}, whose architecture differs from the base "
                                    f"{base_config.name}")
    if reward:  # jaxllm.stages.reward's layout: {"backbone": decoder without lm_head, "head": {kernel, bias}}
        f32 = jnp.float32
        shapes = {"backbone": trained_shapes(config.replace(head="none"), record.get("train", ())),
                  "head": {"kernel": jax.ShapeDtypeStruct((config.hidden_size,), f32),
                           "bias": jax.ShapeDtypeStruct((), f32)}}
    else:
        shapes = trained_shapes(config, record.get("train", ()))
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=single), shapes)
    with jckpt.manager(directory) as mngr:
        step = mngr.latest_step()
        if step is None:
            raise jckpt.CheckpointError(f"{directory}: no saved step")
        try:
            restored = jckpt.restore_tree(mngr, step, target)
        except (ValueError, KeyError, FileNotFoundError) as err:
            raise jckpt.CheckpointError(f"{directory}: step {step} does not hold the adapter of {config.name}: "
                                        f"{str(err).splitlines()[0][:200]}") from None
    leaves = dict(zip(leaf_paths(restored), (np.asarray(x) for x in jax.tree.leaves(restored))))
    return config, leaves, record


def load_reward_adapter(path: str | os.PathLike):
    """(adapted config, {backbone path: numpy leaf}, {"kernel": [embed], "bias": []}, record) of a reward
    model's LoRA run (`jaxllm rm` with `lora:`): the backbone's adapters and the scalar head."""
    config, leaves, record = load_adapter(path, reward=True)
    head = {p[-1]: v for p, v in leaves.items() if p[0] == "head"}
    return config, {p[1:]: v for p, v in leaves.items() if p[0] == "backbone"}, head, record
