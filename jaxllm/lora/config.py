"""The `lora:` section of a recipe."""
from __future__ import annotations

from dataclasses import dataclass, field

from jaxllm.config import LoraSpec, check_choice

LORA_TRAIN = ("embedding", "lm_head", "norms")
BASE_DTYPES = ("float32", "bfloat16", "float16", "int8", "int4")


@dataclass
class LoraConfig:
    """Train low-rank adapters on a frozen base instead of every weight (SFT, DPO, RM). The base
    (`init_from`) is stored in `base_dtype` and gets no gradient, optimizer state or checkpoint space."""
    rank: int = 8
    alpha: float = 16.0               # adapters are scaled by alpha / rank (PEFT's lora_alpha)
    dropout: float = 0.0              # on each adapter's input, while training
    targets: list | str = field(default_factory=lambda: ["all"])  # q_proj … down_proj, W_pack, attention, mlp, all
    train: list = field(default_factory=list)   # base weights that train too: embedding, lm_head, norms
    base_dtype: str | None = None     # frozen base: float32 | bfloat16 | float16 | int8 | int4; null: model.dtype
    init_adapter: str | None = None   # start from this adapter (a PEFT directory or a jaxllm LoRA run)

    def spec(self) -> LoraSpec:
        return LoraSpec(rank=self.rank, alpha=self.alpha, dropout=self.dropout, targets=self.targets)

    def split(self, config, lm_path, axes, shapes, mesh):
        """(trainable axes, trainable shapes, the frozen base's layout) (`jaxllm.lora.plan.layout`)."""
        from jaxllm.lora.plan import layout
        return layout(config, lm_path, axes, shapes, mesh)

    def validate(self) -> None:
        for name in self.train:
            check_choice("lora.train", name, LORA_TRAIN)
        if self.base_dtype is not None:
            check_choice("lora.base_dtype", self.base_dtype, BASE_DTYPES)
