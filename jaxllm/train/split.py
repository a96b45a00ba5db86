"""The trainable / frozen split of a run's parameters (levanter's `is_trainable`): the step differentiates,
updates and checkpoints the trainable tree; the frozen one is an argument it reads (never donated, never a
constant). A LoRA run's frozen base (`jaxllm.lora.plan`) is one case; a stage's frozen companions are others: DPO's
reference is the run's `StartingModel` (below), PPO's reference policy a tree its iteration reads.

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


class StartingModel:
    """The model a run starts from, as a frozen tree a stage reads before training (`Stage.prepare`; DPO's
    reference, which scores every pair once). With a split it is the split's frozen tree merged with the
    trainable part as it starts (LoRA: the base under B = 0 adapters, or `lora.init_adapter`'s), so no second
    copy of the weights; without one, `load()` reads it (the run's `init_from` on its shardings) when asked."""

    def __init__(self, frozen=None, initial=None, load: Callable | None = None):
        self._frozen, self._initial, self._load = frozen, initial, load

    def params(self):
        if self._frozen is not None:
            return merge(self._initial, self._frozen)
        return self._load()
