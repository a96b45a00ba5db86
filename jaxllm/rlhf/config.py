"""The `ppo:` section of a recipe."""
from __future__ import annotations

import dataclasses

from jaxllm.config import ConfigError, check_choice
from jaxllm.train.config import parse_window

# Where the policy's weights are during generation: "gathered" lays a copy out with the FSDP axis unused
# (weights whole on each device, still split over `tensor`) and frees it after; "sharded" decodes with the
# training layout, all-gathering every layer's weights at every decode step.
GENERATION_LAYOUTS = ("gathered", "sharded")


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    iterations: int = 200
    batch_size: int = 64            # prompts (rollouts) per iteration
    minibatch_size: int = 16
    epochs: int = 1                 # passes over each rollout batch
    lr: float = 1e-6                # constant (spec §3.3)
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-5
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    beta: float = 0.01              # KL penalty: 0.01 for 7B/13B, 0.005 for 70B
    clip: float = 0.2               # PPO ratio clip
    value_clip: float = 0.2
    value_coef: float = 0.5
    gamma: float = 1.0
    lam: float = 0.95
    whiten_scores: bool = True      # whiten reward-model scores (Llama 2: logit(R_c)) over each batch
    safety_threshold: float = 0.15  # with two reward models: R_s below this picks the safety score
    generation: str = "gathered"    # policy weights while sampling: gathered (whole per device) | sharded
    generation_chunks: int = 1      # rollouts sampled in this many sequential parts (prefill memory / chunks)
    profile: str | None = None      # START:STOP: a jax.profiler trace of those iterations into RUN/tb
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    save_every: int = 20

    def validate(self) -> None:
        parse_window(self.profile, "ppo.profile")
        if self.batch_size % self.minibatch_size:
            raise ConfigError(f"ppo.batch_size={self.batch_size} is not a multiple of "
                              f"ppo.minibatch_size={self.minibatch_size}")
        if self.generation_chunks < 1 or self.batch_size % self.generation_chunks:
            raise ConfigError(f"ppo.batch_size={self.batch_size} is not a multiple of "
                              f"ppo.generation_chunks={self.generation_chunks}")
        for name in ("iterations", "batch_size", "minibatch_size", "epochs", "max_new_tokens", "save_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ppo.{name} must be >= 1")
        if self.beta < 0 or self.lr <= 0:
            raise ConfigError("ppo.beta must be >= 0 and ppo.lr > 0")
        if not 0 < self.safety_threshold < 1:
            raise ConfigError(f"ppo.safety_threshold is a sigmoid score in (0, 1), got {self.safety_threshold}")
        check_choice("ppo.generation", self.generation, GENERATION_LAYOUTS)
