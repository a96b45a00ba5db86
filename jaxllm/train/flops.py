"""Model FLOPs per token and MFU (spec §9).

Training FLOPs per token = 6·N + 6·L·H_q·Q·T: the PaLM (Appendix B) formula with the attention term halved
for causal masking, as MaxText counts it; N is the total parameter count, L layers, H_q query heads,
Q head dim, T the sequence length. MFU = tokens/s × FLOPs/token / (devices × peak FLOP/s per device).
"""
from __future__ import annotations

from jaxllm.config import ModelConfig

# Dense bf16 peak TFLOP/s per device (one chip / one GPU), matched against `jax.Device.device_kind`;
# the first key that is a substring wins, so more specific names come first.
PEAK_TFLOPS = (
    ("TPU v6 lite", 918.0), ("TPU v6e", 918.0), ("TPU v5 lite", 197.0), ("TPU v5e", 197.0),
    ("TPU v5p", 459.0), ("TPU v5", 459.0), ("TPU v4", 275.0), ("TPU v3", 123.0), ("TPU v2", 45.0),
    ("GB200", 2500.0), ("B200", 2250.0), ("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0),
    ("H800", 989.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10G", 70.0),
    ("V100", 125.0),
)


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training (forward + backward) FLOPs per token, causal attention counted once (halved). With LoRA the
    frozen weights need no weight gradient: 4 FLOPs per frozen parameter, 6 per adapter parameter."""
    from jaxllm.models import count_params

    attention = 6.0 * config.num_layers * config.num_heads * config.head_dim * seq_len
    if config.lora is None:
        return 6.0 * count_params(config) + attention
    frozen = count_params(config.replace(lora=None))
    return 4.0 * frozen + 6.0 * (count_params(config) - frozen) + attention


def peak_flops(device_kind: str, override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of one device, or None when the kind is unknown (e.g. CPU) and no override is given."""
    if override_tflops:
        return override_tflops * 1e12
    for key, tflops in PEAK_TFLOPS:
        if key.lower() in device_kind.lower():
            return tflops * 1e12
    return None


def mfu(tokens_per_second: float, flops_token: float, num_devices: int, peak: float | None) -> float | None:
    if not peak:
        return None
    return tokens_per_second * flops_token / (num_devices * peak)
