"""Every published size as data, plus tiny configurations for tests and the CPU demo."""
from __future__ import annotations

from jaxllm.config import ConfigError, ModelConfig, closest

_PUBLISHED = {
    # Llama 2 (spec §1, §3): untied, eps 1e-5, GQA only on 70B.
    "llama2-7b": dict(family="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                      num_layers=32, num_heads=32, rms_norm_eps=1e-5),
    "llama2-13b": dict(family="llama", vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                       num_layers=40, num_heads=40, rms_norm_eps=1e-5),
    "llama2-70b": dict(family="llama", vocab_size=32000, hidden_size=8192, intermediate_size=28672,
                       num_layers=80, num_heads=64, num_kv_heads=8, rms_norm_eps=1e-5),
    # Baichuan 1 (spec §4–5): 7B RoPE, 13B ALiBi.
    "baichuan-7b": dict(family="baichuan", vocab_size=64000, hidden_size=4096, intermediate_size=11008,
                        num_layers=32, num_heads=32, rms_norm_eps=1e-6),
    "baichuan-13b": dict(family="baichuan", vocab_size=64000, hidden_size=5120,
                         intermediate_size=13696, num_layers=40, num_heads=40, rms_norm_eps=1e-6,
                         position="alibi"),
    # Baichuan 2 (spec §6): NormHead; z-loss 2e-4 is a pretraining recipe setting, not architecture.
    "baichuan2-7b": dict(family="baichuan2", vocab_size=125696, hidden_size=4096,
                         intermediate_size=11008, num_layers=32, num_heads=32, rms_norm_eps=1e-6,
                         norm_head=True),
    "baichuan2-13b": dict(family="baichuan2", vocab_size=125696, hidden_size=5120,
                          intermediate_size=13696, num_layers=40, num_heads=40, rms_norm_eps=1e-6,
                          norm_head=True, position="alibi"),
    # CT-LLM (spec §7): Llama layout, Baichuan2 tokenizer, embedding padded to 125,824 rows.
    "ctllm-2b": dict(family="ctllm", vocab_size=125824, tokenizer_vocab_size=125696, hidden_size=2048,
                     intermediate_size=5504, num_layers=32, num_heads=16, rms_norm_eps=1e-5),
    # Ziya (spec §8): LLaMA-13B with 39,410 pieces padded to 39,424 rows, context 2048.
    "ziya-13b": dict(family="ziya", vocab_size=39424, tokenizer_vocab_size=39410, hidden_size=5120,
                     intermediate_size=13824, num_layers=40, num_heads=40, rms_norm_eps=1e-6,
                     max_position_embeddings=2048),
}

_TINY = dict(hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4,
             max_position_embeddings=128)
_SMALL = {
    # One tiny config per family feature, for parity tests (fp32, random weights).
    "llama2-tiny": dict(family="llama", vocab_size=256, num_kv_heads=2, rms_norm_eps=1e-5, **_TINY),
    "baichuan-tiny": dict(family="baichuan", vocab_size=256, rms_norm_eps=1e-6, **_TINY),
    # 6 heads: ALiBi slopes for a head count that is not a power of two (like 13B's 40).
    "baichuan-13b-tiny": dict(family="baichuan", vocab_size=256, rms_norm_eps=1e-6, position="alibi",
                              **{**_TINY, "hidden_size": 96, "num_heads": 6}),
    "baichuan2-tiny": dict(family="baichuan2", vocab_size=256, rms_norm_eps=1e-6, norm_head=True,
                           **_TINY),
    "baichuan2-13b-tiny": dict(family="baichuan2", vocab_size=256, rms_norm_eps=1e-6, norm_head=True,
                               position="alibi", **{**_TINY, "hidden_size": 80, "num_heads": 5}),
    "ctllm-tiny": dict(family="ctllm", vocab_size=384, tokenizer_vocab_size=300, rms_norm_eps=1e-5,
                       **_TINY),
    "ziya-tiny": dict(family="ziya", vocab_size=272, tokenizer_vocab_size=258, rms_norm_eps=1e-6,
                      **_TINY),
    # The embedded CPU demo: trained from scratch on the shipped corpus in a few minutes.
    "demo": dict(family="llama", vocab_size=4096, hidden_size=192, intermediate_size=512,
                 num_layers=4, num_heads=6, num_kv_heads=2, max_position_embeddings=1024,
                 rms_norm_eps=1e-5),
}

PRESETS = {**_PUBLISHED, **_SMALL}
PUBLISHED = tuple(_PUBLISHED)


def get_preset(name: str, **overrides) -> ModelConfig:
    """ModelConfig for a preset name, with optional field overrides (e.g. dtype="bfloat16")."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}'" + closest(name, PRESETS)
                          + f"; known presets: {', '.join(PRESETS)}")
    return ModelConfig.from_dict({"name": name, **PRESETS[name], **overrides})


# Each family's released generation_config.json defaults (spec §5, §6.6); Llama 2 / Ziya / CT-LLM: Meta's chat
# defaults. `jaxllm generate` / `serve` sample with them and export writes them to generation_config.json.
GENERATION_DEFAULTS = {
    "llama": dict(temperature=0.6, top_p=0.9, max_new_tokens=512),
    "baichuan": dict(temperature=0.3, top_k=5, top_p=0.85, repetition_penalty=1.1, max_new_tokens=2048),
    "baichuan2": dict(temperature=0.3, top_k=5, top_p=0.85, repetition_penalty=1.05, max_new_tokens=2048),
    "ziya": dict(temperature=0.85, top_p=0.85, repetition_penalty=1.0, max_new_tokens=1024),
    "ctllm": dict(temperature=0.6, top_p=0.9, repetition_penalty=1.05, max_new_tokens=512),
}
