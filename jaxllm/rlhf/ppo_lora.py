"""LoRA for `jaxllm ppo` (a `lora:` section in a PPO recipe): the policy trains adapters on a frozen base
(read from the policy checkpoint, stored in `lora.base_dtype`, bf16 or int8/int4-quantized, by
`jaxllm.lora.plan`); the reference policy is that base with the adapters off (no second copy of the
weights); the value model is a scalar head plus its own adapters on the same frozen base (the base never
changes, so sharing it is exact). What trains (both adapter sets, the head) gets AdamW state and
checkpoints; the base's path and digest go to RUN/checkpoints/adapter.json, and a resumed run on another
base is refused. `LoraPolicy` is the split `jaxllm.rlhf.ppo` reads (see `jaxllm.rlhf.parts`).
"""
from __future__ import annotations

from types import SimpleNamespace

import jax

from jaxllm import sharding
from jaxllm.config import ConfigError, ModelConfig
from jaxllm.lora import plan as lora_plan
from jaxllm.lora.config import LoraConfig
from jaxllm.models import param_logical_axes, param_shapes
from jaxllm.stages import reward
from jaxllm.train.split import merge


class LoraPolicy:
    """PPO's split with LoRA: trainable (policy adapters, {"backbone": value adapters, "head": ...}), frozen:
    the base (`frozen_sh` its shardings)."""

    def __init__(self, model_config: ModelConfig, base_path, lora_config: LoraConfig, mesh, seed: int = 0,
                 log=print, *, abstract: bool = False):
        """abstract: lay out the split without reading the base (the compile-only pre-flight's: `start`
        then gives ShapeDtypeStructs on their shardings)."""
        lora_config.validate()
        if lora_config.train:
            raise ConfigError(f"lora.train={lora_config.train}: PPO's reference is the base with the adapters off, "
                              f"so no base weight trains; leave lora.train empty")
        if lora_config.init_adapter:
            raise ConfigError("lora.init_adapter: PPO's adapters start at B = 0 (the policy is its base); merge the "
                              "adapter into the policy first (jaxllm convert ... --merge)")
        self.ref_config = model_config.replace(lora=None)
        self.config = model_config.replace(lora=lora_config.spec())
        self.key = ("lora", str(base_path), lora_config.base_dtype)
        self.run = SimpleNamespace(init_from=str(base_path), lora=lora_config, model=self.config,
                                   base_model=self.ref_config)
        self._axes, shapes, self.layout = lora_plan.layout(self.run, (), param_logical_axes(self.config),
                                                           param_shapes(self.config), mesh)
        self.frozen_sh = self.layout.frozen_sh
        param_sh = sharding.tree_shardings(self._axes, shapes, mesh)
        self.abstract = abstract
        if abstract:
            self.base = self.layout.abstract_frozen()
            self.adapters = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                                         param_sh)
            self.digest = None
            return
        plan = SimpleNamespace(frozen=self.layout, param_shapes=shapes, init_key=jax.random.key(seed),
                               param_sh=param_sh)
        self.base, self.adapters, self.digest = lora_plan.start(self.run, plan, lora_plan.lm_init(self.run), log)
        log(f"PPO LoRA: {sum(x.size for x in jax.tree.leaves(shapes)) / 1e6:.3f}M adapter parameters per model on "
            f"a frozen {self.layout.base_dtype} base")

    def axes(self):
        return self._axes, {"backbone": self._axes, "head": reward.logical_axes(self.config)["head"]}

    def start(self, policy, value, rng):
        """(initial adapters, initial value model, the frozen base); `policy`/`value` are unused (the base is
        read from the checkpoint; the value model starts as the policy's adapters and a fresh head)."""
        make_head = lambda key: reward.from_lm_params({}, self.config, key)["head"]
        head = jax.eval_shape(make_head, rng) if self.abstract else make_head(rng)
        return self.adapters, {"backbone": self.adapters, "head": head}, self.base

    def policy(self, trainable, frozen):
        return merge(trainable, frozen)

    def reference(self, frozen):
        return frozen

    def value(self, trainable, frozen):
        backbone = {k: v for k, v in frozen.items() if k != "lm_head"}
        return {"backbone": merge(trainable["backbone"], backbone), "head": trainable["head"]}

    def generation(self, trainable, frozen, axes, mesh, layout: str):
        return merge(trainable, frozen)  # the adapted policy on its base, laid out as it trains

    def record(self, directory, resuming: bool) -> None:
        lora_plan.check_record(directory, self.run, self.digest, (), resuming)



def base_config(path, tokenizer=None):
    """(the base's config, its tokenizer or None) of the jaxllm checkpoint at `path`, its weights unread
    (`LoraPolicy` reads them, quantized as they arrive)."""
    from jaxllm import checkpoint as jckpt
    from jaxllm.convert.core import check_tokenizer_fits
    from jaxllm.tokenizer import Tokenizer

    if not jckpt.is_checkpoint(jckpt.resolve(path)):
        raise ConfigError(f"lora: the policy {path} must be a jaxllm checkpoint or run (convert an HF model first)")
    config = jckpt.read_model_config(jckpt.resolve(path))
    tok_path = tokenizer or jckpt.find_tokenizer(jckpt.resolve(path))
    tok = Tokenizer.load(tok_path, family=config.family) if tok_path else None
    if tok is not None:
        check_tokenizer_fits(tok, config, str(path))
    return config, tok
