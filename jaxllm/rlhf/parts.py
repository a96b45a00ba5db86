"""What PPO trains and what it only reads: the trainable / frozen split of its models (`jaxllm.train.split`).

PPO's iteration (`jaxllm.rlhf.ppo`) differentiates, updates and checkpoints a trainable (policy, value) pair
and reads a frozen tree, through one of these; it names no kind of split. `WholePolicy` (the default) trains
the policy and value model whole and freezes the starting policy as the reference; `jaxllm.rlhf.ppo_lora`'s
`LoraPolicy` trains adapters (and the value head) on one frozen, maybe quantized base, whose adapters-off
forward is the reference.
"""
from __future__ import annotations

import jax

from jaxllm.config import ModelConfig
from jaxllm.stages import reward


class WholePolicy:
    """The policy and the value model train in full; the frozen tree is the starting policy (the reference)."""

    frozen_sh = None  # the frozen tree is laid out like the policy

    def __init__(self, model_config: ModelConfig):
        self.config = self.ref_config = model_config
        self.key = ("whole",)

    def axes(self):
        from jaxllm.models import param_logical_axes
        return param_logical_axes(self.config), reward.logical_axes(self.config)

    def start(self, policy, value, rng):
        """(initial policy, initial value model, frozen tree or None: the placed policy itself)."""
        return policy, (reward.from_lm_params(policy, self.config, rng) if value is None else value), None

    def policy(self, trainable, frozen):
        return trainable

    def reference(self, frozen):
        return frozen

    def value(self, trainable, frozen):
        return trainable

    def generation(self, trainable, frozen, axes, mesh, layout: str):
        from jaxllm.rlhf.rollout import generation_params
        return generation_params(trainable, axes, mesh, layout)

    def record(self, directory, resuming: bool) -> None:
        pass


def shapes(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
