"""Load a model for inference from a jaxllm checkpoint (or training run) or an HF directory."""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp

from jaxllm.config import ModelConfig


def load_model(path: str | Path, *, dtype: str | None = None, family: str | None = None,
               tokenizer: str | Path | None = None):
    """(config, params, tokenizer or None). An HF directory (config.json + weights) is converted in
    memory on the fly; `dtype` sets the compute dtype (parameters are kept as stored)."""
    from jaxllm.checkpoint import CheckpointError, find_tokenizer, is_checkpoint, load_params, resolve
    from jaxllm.tokenizer import Tokenizer

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if (path / "config.json").is_file() and not is_checkpoint(resolve(path)):
        from jaxllm.convert.hf_config import model_config_from_hf
        from jaxllm.convert.core import validate_source
        from jaxllm.convert.mapping import hf_to_params, tensor_maps
        from jaxllm.convert.readers import open_hf

        config = model_config_from_hf(path, family, name=path.name)
        reader = open_hf(path)
        validate_source(reader, tensor_maps(config), str(path))
        params = jax.tree.map(jnp.asarray, hf_to_params(reader.get, config))
        tok_path = path / "tokenizer.model" if (path / "tokenizer.model").is_file() else None
    else:
        params, config = load_params(path)
        tok_path = find_tokenizer(resolve(path))
    if dtype:
        config = config.replace(dtype=dtype)
    if tokenizer is not None:
        tok_path = tokenizer
    return config, params, (Tokenizer.load(tok_path) if tok_path else None)
