"""config.json (HF) / params.json (Meta) ⇄ ModelConfig, with family detection (spec §1)."""
from __future__ import annotations

import math
import re
from pathlib import Path

from jaxllm import storage
from jaxllm.config import FAMILIES, ConfigError, ModelConfig, closest
from jaxllm.convert.readers import ConversionError, read_json
from jaxllm.models.presets import GENERATION_DEFAULTS

# Embedding rows → (family, tokenizer pieces) for Llama-layout releases with padded vocabularies.
_PADDED = {125824: ("ctllm", 125696), 39424: ("ziya", 39410)}
# Keys jaxllm's exports add to config.json (transformers keeps unknown keys as plain attributes), so an
# export of a non-standard size re-imports as what it was.
FAMILY_KEY = "jaxllm_family"
PIECES_KEY = "tokenizer_vocab_size"


def detect_family(cfg: dict, where: str = "config.json", directory: Path | None = None) -> str:
    """The family of an HF config.json (spec §1): model_type / architectures; for Baichuan, Baichuan 2 when
    the modeling code shipped in `directory` has NormHead, else by the vocabulary size (125,696)."""
    if cfg.get(FAMILY_KEY) in FAMILIES:
        return cfg[FAMILY_KEY]
    model_type = cfg.get("model_type")
    arch = (cfg.get("architectures") or [""])[0]
    if model_type == "llama" or arch == "LlamaForCausalLM":
        return _PADDED.get(cfg.get("vocab_size"), ("llama", None))[0]
    # Baichuan-7B says BaiChuanForCausalLM (capital C), the others BaichuanForCausalLM.
    if model_type == "baichuan" or str(arch).lower() == "baichuanforcausallm":
        code = modeling_file(cfg, directory) if directory is not None else None
        if code is not None:
            return "baichuan2" if _NORM_HEAD.search(code.read_text("utf-8", errors="replace")) else "baichuan"
        return "baichuan2" if cfg.get("vocab_size") == 125696 else "baichuan"
    raise ConversionError(f"{where}: unknown model_type {model_type!r} (architectures {arch!r}); expected "
                          f"'llama' or 'baichuan', or force one with --family {{{','.join(FAMILIES)}}}")


def _rope_theta(cfg: dict, where) -> float:
    """rope_theta, top-level (transformers 4) or in rope_parameters (transformers 5); no scaling."""
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ConversionError(f"{where}: rope_parameters must be an object, got {rope!r}")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise ConversionError(f"{where}: RoPE scaling '{kind}' is not supported (plain RoPE only)")
    return float(rope.get("rope_theta") or cfg.get("rope_theta") or 10000.0)


# Read as text, never imported: Baichuan-13B's and Baichuan2-13B's modeling files build ALiBi masks
# (`_get_interleave`, `_gen_alibi_mask`), the 7B files rotate queries and keys (`RotaryEmbedding`).
_ALIBI_MARKERS = re.compile(r"\b(_get_interleave|_gen_alibi_mask|_buffered_future_mask|alibi\w*)\b", re.I)
_ROPE_MARKERS = re.compile(r"\b(RotaryEmbedding|rotate_half|apply_rotary_pos_emb|inv_freq)\b")
_NORM_HEAD = re.compile(r"\bclass\s+NormHead\b")  # Baichuan 2's normalised output rows


def modeling_file(cfg: dict, directory: Path) -> Path | None:
    """The modeling file the checkpoint ships for AutoModelForCausalLM (`auto_map`), else
    `modeling_baichuan.py`, if present in `directory`."""
    ref = (cfg.get("auto_map") or {}).get("AutoModelForCausalLM") if isinstance(cfg.get("auto_map"), dict) else None
    module = ref.split("--")[-1].rsplit(".", 1)[0] if isinstance(ref, str) and "." in ref else "modeling_baichuan"
    path = directory / f"{module}.py"
    return path if path.is_file() else None


def baichuan_position(cfg: dict, directory: Path) -> tuple[str, str]:
    """("alibi" | "rope", why) for a Baichuan checkpoint, as upstream decides: by the modeling code it
    ships (`auto_map`); then by jaxllm's own `position_encoding`; by the size (5120 wide and 40 layers
    is 13B: ALiBi) only as a last resort."""
    path = modeling_file(cfg, directory)
    if path is not None:
        text = path.read_text("utf-8", errors="replace")
        alibi, rope = bool(_ALIBI_MARKERS.search(text)), bool(_ROPE_MARKERS.search(text))
        if alibi != rope:
            kind = "alibi" if alibi else "rope"
            what = "builds ALiBi masks" if alibi else "applies rotary embeddings"
            return kind, f"{path.name} (the shipped modeling code) {what}"
        unclear = f"{path.name} mentions {'both ALiBi and RoPE' if alibi else 'neither ALiBi nor RoPE'}; "
    else:
        unclear = "no modeling file shipped; "
    if cfg.get("position_encoding") in ("alibi", "rope"):
        return cfg["position_encoding"], unclear + "config.json says position_encoding"
    size = (cfg.get("hidden_size"), cfg.get("num_hidden_layers"))
    if size == (5120, 40):
        return "alibi", unclear + "5120 wide x 40 layers is the 13B size, which uses ALiBi"
    return "rope", unclear + f"{size[0]} wide x {size[1]} layers is not the 13B size: RoPE as in 7B"


def model_config_from_hf(path: str | Path, family: str | None = None, name: str = "converted",
                         notes: list[str] | None = None) -> ModelConfig:
    """The ModelConfig of an HF directory (or config.json); `notes` receives one line per decision that
    the file does not state outright (a Baichuan checkpoint's position encoding)."""
    path = storage.path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ConversionError(f"{file}: no config.json")
    cfg = read_json(file)
    if family is not None and family not in FAMILIES:
        raise ConversionError(f"unknown family {family!r}{closest(family, FAMILIES)}")
    if family is None:
        family = detect_family(cfg, str(file), file.parent)
        code = modeling_file(cfg, file.parent) if family in ("baichuan", "baichuan2") else None
        if notes is not None and code is not None and FAMILY_KEY not in cfg:
            notes.append(f"family: {family} ({code.name} {'has' if family == 'baichuan2' else 'has no'} NormHead)")
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if field not in cfg:
            raise ConversionError(f"{file}: missing field '{field}'")
    hidden, layers, heads = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim")
    if head_dim is not None and isinstance(hidden, int) and isinstance(heads, int) and heads > 0 \
            and hidden % heads == 0 and head_dim != hidden // heads:
        raise ConversionError(f"{file}: head_dim {head_dim} is not hidden_size/num_attention_heads = "
                              f"{hidden}/{heads}; jaxllm needs head_dim = hidden_size/num_heads")
    alibi = False
    if family in ("baichuan", "baichuan2"):
        position, why = baichuan_position(cfg, file.parent)
        alibi = position == "alibi"
        if notes is not None:
            notes.append(f"position encoding: {position.replace('alibi', 'ALiBi').replace('rope', 'RoPE')} ({why})")
    pieces = cfg.get(PIECES_KEY)
    if pieces is None and family in ("ctllm", "ziya"):
        pieces = _PADDED.get(cfg["vocab_size"], (None, None))[1]
    try:
        return ModelConfig(
            name=name, family=family, vocab_size=cfg["vocab_size"], hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"], num_layers=layers, num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            max_position_embeddings=cfg.get("max_position_embeddings") or cfg.get("model_max_length") or 4096,
            position="alibi" if alibi else "rope",
            rope_theta=10000.0 if alibi else _rope_theta(cfg, file),
            rms_norm_eps=float(cfg.get("rms_norm_eps") or cfg.get("epsilon") or 1e-6),
            norm_head=family == "baichuan2", tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            tokenizer_vocab_size=pieces,
            bos_id=cfg["bos_token_id"] if isinstance(cfg.get("bos_token_id"), int) else 1,
            eos_id=cfg["eos_token_id"] if isinstance(cfg.get("eos_token_id"), int) else 2,
            pad_id=cfg["pad_token_id"] if isinstance(cfg.get("pad_token_id"), int) else 0)
    except (ConfigError, ValueError, TypeError) as err:
        raise ConversionError(f"{file}: {_plain(err)}") from None


_HF_NAMES = (("model.num_layers", "num_hidden_layers"), ("model.num_heads", "num_attention_heads"),
             ("model.num_kv_heads", "num_key_value_heads"), ("model.tokenizer_vocab_size", PIECES_KEY))
_META_NAMES = (("model.num_layers", "n_layers"), ("model.num_heads", "n_heads"),
               ("model.num_kv_heads", "n_kv_heads"), ("model.hidden_size", "dim"))


def _plain(err: Exception, names=_HF_NAMES) -> str:
    """ModelConfig's messages name `model.<field>`; say the file's own field names instead."""
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    for ours, theirs in names + (("model.", ""),):
        text = text.replace(ours, theirs)
    return text


def model_config_from_meta(directory: Path, vocab_rows: int, family: str | None = None) -> ModelConfig:
    """Meta params.json: FFN width from `multiple_of` and `ffn_dim_multiplier` (spec §1 note)."""
    file = directory / "params.json"
    p = read_json(file)
    if family not in (None, "llama", "ctllm", "ziya"):
        raise ConversionError(f"{file}: Meta's consolidated checkpoints are Llama-layout; --family {family} "
                              f"does not apply")
    for field in ("dim", "n_layers", "n_heads"):
        if field not in p:
            raise ConversionError(f"{file}: missing field '{field}'")
    try:
        dim, multiple = p["dim"], p.get("multiple_of", 256)
        ffn = int(float(p.get("ffn_dim_multiplier") or 1) * int(8 * dim / 3))
        ffn = multiple * math.ceil(ffn / multiple)
        return ModelConfig(name="converted", family=family or "llama", vocab_size=vocab_rows, hidden_size=dim,
                           intermediate_size=ffn, num_layers=p["n_layers"], num_heads=p["n_heads"],
                           num_kv_heads=p.get("n_kv_heads") or p["n_heads"],
                           rms_norm_eps=float(p.get("norm_eps", 1e-5)),
                           rope_theta=float(p.get("rope_theta", 10000.0)))
    except (ConfigError, ValueError, TypeError, ZeroDivisionError) as err:
        raise ConversionError(f"{file}: {_plain(err, _META_NAMES)}") from None


def hf_config_from_model(cfg: ModelConfig, dtype: str, layout: str | None = None) -> tuple[dict, dict]:
    """(config.json, generation_config.json) that the PyTorch world loads for this family; `layout`
    "llama" writes a Baichuan model as a stock LlamaForCausalLM."""
    torch_dtype = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[dtype]
    common = dict(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                  num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, vocab_size=cfg.vocab_size,
                  rms_norm_eps=cfg.rms_norm_eps, hidden_act="silu", tie_word_embeddings=cfg.tie_embeddings,
                  bos_token_id=cfg.bos_id, eos_token_id=cfg.eos_id, pad_token_id=cfg.pad_id,
                  initializer_range=cfg.initializer_range, torch_dtype=torch_dtype, use_cache=True)
    common[FAMILY_KEY] = cfg.family
    if cfg.tokenizer_vocab_size is not None:
        common[PIECES_KEY] = cfg.tokenizer_vocab_size
    baichuan = cfg.family in ("baichuan", "baichuan2")
    if baichuan and layout != "llama":
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
        if baichuan:  # read back as the Baichuan model it is (jaxllm_family), RoPE whatever its size
            config["position_encoding"] = cfg.position
    sampling = GENERATION_DEFAULTS[cfg.family]
    generation = dict(bos_token_id=cfg.bos_id, eos_token_id=cfg.eos_id, pad_token_id=cfg.pad_id, do_sample=True,
                      temperature=sampling["temperature"], top_p=sampling["top_p"],
                      max_new_tokens=sampling["max_new_tokens"])
    if sampling.get("top_k"):
        generation["top_k"] = sampling["top_k"]
    if sampling.get("repetition_penalty", 1.0) != 1.0:
        generation["repetition_penalty"] = sampling["repetition_penalty"]
    if cfg.family in ("baichuan", "baichuan2"):
        generation.update(user_token_id=195, assistant_token_id=196)
    return config, generation
