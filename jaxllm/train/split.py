"""The trainable / frozen split of a run's parameters (levanter's `is_trainable`): the step differentiates,
updates and checkpoints the trainable tree; the frozen one is an argument it reads (never donated, never a
constant). A LoRA run's frozen base (`jaxllm.lora.plan`) is one case; a stage's frozen companions (DPO's
reference, PPO's reference policy) are others, handed to their loss or iteration the same way.

A section of the run config that freezes part of the parameters provides `split(config, lm_path, axes,
shapes, mesh) -> (trainable axes, trainable shapes, FrozenPart)` (`RunConfig.frozen_split`); the loop calls
it and the `FrozenPart` methods below, and names no particular kind of split.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol


class FrozenPart(Protocol):
    frozen_shapes: Any        # ShapeDtypeStructs of the frozen tree as stored (e.g. quantized)
    frozen_sh: Any            # its NamedShardings

    def abstract_frozen(self) -> Any:
        """The frozen tree as sharded ShapeDtypeStructs (the step's last argument)."""

    def start(self, config, plan, init_fn: Callable | None, log: Callable) -> tuple[Any, Any]:
        """(frozen tree, initial trainable tree) on the plan's devices; `init_fn(rng)`: the stage's own
        initialiser of the full tree, if it has one."""

    def record(self, directory, config, resuming: bool) -> None:
        """Write (or check, when resuming) what the saved trainable part needs beside it to be used."""

    def describe(self, plan) -> str:
        """One line: how much trains, on what."""


def merge(trainable, frozen):
    """The parameters a loss sees: the union of two nested dicts (a leaf in both: `trainable`'s)."""
    if not isinstance(trainable, dict) or not isinstance(frozen, dict):
        return trainable
    out = dict(frozen)
    for key, value in trainable.items():
        out[key] = merge(value, frozen[key]) if key in frozen else value
    return out
