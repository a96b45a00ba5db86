"""config.json (HF) / params.json (Meta) ⇄ ModelConfig, with family detection (spec §1)."""
from __future__ import annotations

import json
import math
from pathlib import Path

from jaxllm.config import FAMILIES, ModelConfig, closest
from jaxllm.convert.readers import ConversionError

# Embedding rows → (family, tokenizer pieces) for Llama-layout releases with padded vocabularies.
_PADDED = {125824: ("ctllm", 125696), 39424: ("ziya", 39410)}


def detect_family(cfg: dict, where: str = "config.json") -> str:
    model_type = cfg.get("model_type")
    arch = (cfg.get("architectures") or [""])[0]
    if model_type == "llama" or arch == "LlamaForCausalLM":
        return _PADDED.get(cfg.get("vocab_size"), ("llama", None))[0]
    if model_type == "baichuan" or arch.lower() == "baichuanforcausallm":
        return "baichuan2" if cfg.get("vocab_size") == 125696 else "baichuan"
    raise ConversionError(f"{where}: unknown model_type {model_type!r} (architectures {arch!r}); expected "
                          f"'llama' or 'baichuan', or force one with --family {{{','.join(FAMILIES)}}}")


def model_config_from_hf(path: str | Path, family: str | None = None, name: str = "converted") -> ModelConfig:
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ConversionError(f"{file}: no config.json")
    try:
        cfg = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ConversionError(f"{file}: invalid JSON: {err.msg}") from None
    if family is not None and family not in FAMILIES:
        raise ConversionError(f"unknown family {family!r}{closest(family, FAMILIES)}")
    family = family or detect_family(cfg, str(file))
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if field not in cfg:
            raise ConversionError(f"{file}: missing field '{field}'")
    hidden, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    # Baichuan's config does not say ALiBi; its 13B models (5120 wide, 40 layers) use it, 7B use RoPE.
    # jaxllm's own exports also say it explicitly (`position_encoding`), for non-standard sizes.
    alibi = family in ("baichuan", "baichuan2") and (
        cfg.get("position_encoding", "alibi" if (hidden, layers) == (5120, 40) else "rope") == "alibi")
    return ModelConfig(
        name=name, family=family, vocab_size=cfg["vocab_size"], hidden_size=hidden,
        intermediate_size=cfg["intermediate_size"], num_layers=layers, num_heads=cfg["num_attention_heads"],
        num_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        max_position_embeddings=cfg.get("max_position_embeddings") or cfg.get("model_max_length") or 4096,
        position="alibi" if alibi else "rope", rope_theta=float(cfg.get("rope_theta") or 10000.0),
        rms_norm_eps=float(cfg.get("rms_norm_eps") or cfg.get("epsilon") or 1e-6),
        norm_head=family == "baichuan2", tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        tokenizer_vocab_size=_PADDED.get(cfg["vocab_size"], (None, None))[1] if family in ("ctllm", "ziya") else None,
        bos_id=cfg.get("bos_token_id") if cfg.get("bos_token_id") is not None else 1,
        eos_id=cfg.get("eos_token_id") if isinstance(cfg.get("eos_token_id"), int) else 2,
        pad_id=cfg.get("pad_token_id") if isinstance(cfg.get("pad_token_id"), int) else 0)


def model_config_from_meta(directory: Path, vocab_rows: int, family: str | None = None) -> ModelConfig:
    """Meta params.json: FFN width from `multiple_of` and `ffn_dim_multiplier` (spec §1 note)."""
    p = json.loads((directory / "params.json").read_text())
    dim, multiple = p["dim"], p.get("multiple_of", 256)
    ffn = int(p.get("ffn_dim_multiplier", 1) * int(8 * dim / 3))
    ffn = multiple * math.ceil(ffn / multiple)
    return ModelConfig(name="converted", family=family or "llama", vocab_size=vocab_rows, hidden_size=dim,
                       intermediate_size=ffn, num_layers=p["n_layers"], num_heads=p["n_heads"],
                       num_kv_heads=p.get("n_kv_heads") or p["n_heads"], rms_norm_eps=p.get("norm_eps", 1e-5),
                       rope_theta=float(p.get("rope_theta", 10000.0)))


def hf_config_from_model(cfg: ModelConfig, dtype: str) -> tuple[dict, dict]:
    """(config.json, generation_config.json) that the PyTorch world loads for this family."""
    from jaxllm.inference.sampling import FAMILY_DEFAULTS

    torch_dtype = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[dtype]
    common = dict(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                  num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, vocab_size=cfg.vocab_size,
                  rms_norm_eps=cfg.rms_norm_eps, hidden_act="silu", tie_word_embeddings=cfg.tie_embeddings,
                  bos_token_id=cfg.bos_id, eos_token_id=cfg.eos_id, pad_token_id=cfg.pad_id,
                  initializer_range=cfg.initializer_range, torch_dtype=torch_dtype, use_cache=True)
    if cfg.family in ("baichuan", "baichuan2"):
        arch = "BaiChuanForCausalLM" if cfg.family == "baichuan" and cfg.position == "rope" else "BaichuanForCausalLM"
        config = dict(architectures=[arch], model_type="baichuan", model_max_length=cfg.max_position_embeddings,
                      max_position_embeddings=cfg.max_position_embeddings, position_encoding=cfg.position,
                      **common)
        if cfg.family == "baichuan2":
            config["z_loss_weight"] = cfg.z_loss_weight
    else:
        config = dict(architectures=["LlamaForCausalLM"], model_type="llama",
                      num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=cfg.max_position_embeddings,
                      rope_theta=cfg.rope_theta, rope_scaling=None, attention_bias=False, pretraining_tp=1,
                      **common)
    sampling = FAMILY_DEFAULTS.get(cfg.family)
    generation = dict(bos_token_id=cfg.bos_id, eos_token_id=cfg.eos_id, pad_token_id=cfg.pad_id, do_sample=True,
                      temperature=sampling.temperature, top_p=sampling.top_p,
                      max_new_tokens=sampling.max_new_tokens)
    if sampling.top_k:
        generation["top_k"] = sampling.top_k
    if sampling.repetition_penalty != 1.0:
        generation["repetition_penalty"] = sampling.repetition_penalty
    if cfg.family in ("baichuan", "baichuan2"):
        generation.update(user_token_id=195, assistant_token_id=196)
    return config, generation
