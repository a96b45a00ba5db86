"""Load a model for inference from a jaxllm checkpoint (or training run) or an HF directory, optionally
sharded over a mesh of devices."""
from __future__ import annotations

from pathlib import Path

import jax


def serving_mesh(spec: str | None = "auto", devices=None):
    """The mesh `generate`/`chat` shard params over: 'auto' puts every device on the tensor axis (heads,
    MLP and vocabulary split, so each device holds 1/n of the weights; None with one device), 'none' is
    one device, and 'DATA,FSDP,TENSOR' gives the sizes (-1: the remaining devices)."""
    from jaxllm.sharding import make_mesh

    devices = list(jax.devices() if devices is None else devices)
    spec = (spec or "auto").strip().lower()
    if spec == "none" or (spec == "auto" and len(devices) == 1):
        return None
    if spec == "auto":
        return make_mesh(data=1, fsdp=1, tensor=-1, devices=devices)
    try:
        data, fsdp, tensor = (int(x) for x in spec.split(","))
    except ValueError:
        raise ValueError(f"--mesh must be 'auto', 'none' or DATA,FSDP,TENSOR (e.g. 1,1,8), got {spec!r}") from None
    return make_mesh(data, fsdp, tensor, devices=devices)


def load_model(path: str | Path, *, dtype: str | None = None, family: str | None = None,
               tokenizer: str | Path | None = None, mesh=None, adapter: str | Path | None = None):
    """(config, params, tokenizer or None). An HF directory (config.json + weights) is converted in
    memory on the fly; `dtype` sets the compute dtype (parameters are kept as stored). With `mesh`,
    each device receives only its shard of every parameter. The tokenizer (the one stored with the
    checkpoint, or `tokenizer`) knows the model family's BOS default and its own added tokens, each of
    which must have an embedding row.

    adapter: a LoRA adapter (a LoRA run, a jaxllm adapter or a PEFT directory) to run on top of the model
    at `path`; its leaves join the parameters and the config gets its `lora`. A LoRA run given as `path`
    runs on the base it recorded."""
    from jaxllm.lora import files as adapters
    from jaxllm.checkpoint import (CheckpointError, find_tokenizer, is_checkpoint, load_params, read_model_config,
                                   resolve)
    from jaxllm.convert.core import check_tokenizer_fits
    from jaxllm.models import param_shardings
    from jaxllm.tokenizer import Tokenizer

    from jaxllm import storage

    storage.check_bucket(path)  # a missing bucket or no access: one line naming it
    path = storage.path(path)  # local, or gs:// / s3:// kept intact
    if not storage.exists(path):
        raise CheckpointError(f"{path}: no such checkpoint directory")
    record = adapters.read_record(path) if adapter is None and not (path / "config.json").is_file() else None
    if record is not None:  # a LoRA run or adapter: its recorded base, with it on top
        if not record.get("base") or not storage.exists(record["base"]):
            raise CheckpointError(f"{path}: a LoRA adapter whose base ({record.get('base')}) is not there; give "
                                  f"the base with --checkpoint BASE --adapter {path}")
        config, params, tok = load_model(record["base"], dtype=dtype, family=family, tokenizer=tokenizer, mesh=mesh,
                                         adapter=path)
        if tok is None and find_tokenizer(resolve(path)):  # the run's own copy of its tokenizer
            tok = Tokenizer.load(find_tokenizer(resolve(path)), family=config.family)
            check_tokenizer_fits(tok, config, str(path))
        return config, params, tok
    if (path / "config.json").is_file() and not is_checkpoint(resolve(path)):
        from jaxllm.convert.hf_config import model_config_from_hf
        from jaxllm.convert.core import validate_source
        from jaxllm.convert.mapping import hf_to_params, layout_of, tensor_maps
        from jaxllm.convert.readers import open_hf

        config = model_config_from_hf(path, family, name=path.name)
        reader = open_hf(path)
        layout = layout_of(reader.keys())
        validate_source(reader, tensor_maps(config, layout), str(path))
        host = hf_to_params(reader.get, config, layout=layout)
        params = jax.device_put(host, param_shardings(config, mesh) if mesh is not None else None)
        tok_path = path / "tokenizer.model" if (path / "tokenizer.model").is_file() else None
    else:
        config = read_model_config(resolve(path))
        params, config = load_params(path, config,
                                     shardings=param_shardings(config, mesh) if mesh is not None else None)
        tok_path = find_tokenizer(resolve(path))
    if adapter is not None:
        config, params = _with_adapter(config, params, adapter, mesh)
    if dtype:
        config = config.replace(dtype=dtype)
    if tokenizer is not None:
        tok_path = tokenizer
    tok = Tokenizer.load(tok_path, family=config.family) if tok_path else None
    if tok is not None:
        check_tokenizer_fits(tok, config, str(path))
    return config, params, tok


def _with_adapter(config, params, adapter, mesh):
    """(adapted config, params + adapter leaves); refuses an adapter whose recorded base is another."""
    from jaxllm.lora import files as adapters
    from jaxllm.checkpoint import CheckpointError
    from jaxllm.lora.model import merge
    from jaxllm.models import param_shardings

    adapted, leaves, record = adapters.load_adapter(adapter, config)
    if record.get("base_digest"):
        digest = adapters.tree_digest(params)
        if digest != record["base_digest"]:
            raise CheckpointError(f"{adapter}: trained on another base (digest {record['base_digest']} of "
                                  f"{record.get('base')}), not this one ({digest})")
    config = config.replace(lora=adapted.lora)
    shardings = param_shardings(config, mesh) if mesh is not None else None
    placed = {}
    for p, value in leaves.items():
        target = shardings
        for key in p if shardings is not None else ():
            target = target[key]
        placed[p] = jax.device_put(value, target)
    return config, merge(adapters.nest(placed), params)
