"""Training: the run engine every stage uses, run config, optimizer, losses, the one train loop, checkpoints,
metrics.

Imported lazily, so `jaxllm train --help` does not pay for JAX:

    from jaxllm.train import load_config, train
    result = train(load_config("configs/demo.yaml", ["train.steps=10"]))
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "RunConfig": "jaxllm.train.config", "load_config": "jaxllm.train.config",
    "from_dict": "jaxllm.train.config", "OptimizerConfig": "jaxllm.train.config",
    "train": "jaxllm.train.loop", "TrainResult": "jaxllm.train.loop",
    "Stage": "jaxllm.train.stage", "pretraining_stage": "jaxllm.train.stage",
    "lm_loss": "jaxllm.train.loss", "make_train_step": "jaxllm.train.step",
    "make_optimizer": "jaxllm.train.optim", "make_schedule": "jaxllm.train.optim",
    "flops_per_token": "jaxllm.train.flops",
    "Run": "jaxllm.train.engine", "Shards": "jaxllm.train.engine",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'jaxllm.train' has no attribute '{name}'")
