"""PEFT LoRA adapters ⇄ jaxllm adapters, exactly, for every family.

PEFT's file (`adapter_model.safetensors`) holds, per adapted HF Linear (weight [out, in]),
`base_model.model.model.layers.{i}.<module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r], scaled by
lora_alpha / r; `modules_to_save` keep whole copies under the module's own name. jaxllm's adapter of the
same weight is A [in..., r], B [r, out...] (`jaxllm.lora.model`): a transpose and a reshape apart.

Baichuan's q/k/v are one Linear, W_pack [3H, H]. PEFT's adapter on it (A [r, H], B [3H, r]) is jaxllm's
target `qkv`: A shared by q, k and v, B split into its q/k/v rows. jaxllm's separate q/k/v adapters of rank r
export as a W_pack adapter of rank c·r for the c adapted projections (A stacked, B block-diagonal,
`rank_pattern`/`alpha_pattern` keep alpha/rank), and import back to separate adapters (the safetensors
metadata names them); both directions are exact.
"""
from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np

from jaxllm.config import LoraSpec, ModelConfig
from jaxllm.convert.mapping import BAICHUAN_FAMILIES
from jaxllm.convert.readers import ConversionError

PREFIX = "base_model.model."
_LLAMA_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                  "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
_LEAF = {"q": ("attn", "wq"), "k": ("attn", "wk"), "v": ("attn", "wv"), "o": ("attn", "wo"),
         "gate": ("mlp", "gate"), "up": ("mlp", "up"), "down": ("mlp", "down")}
W_PACK = "self_attn.W_pack"
_SAVED = {"embedding": [("model.embed_tokens.weight", ("embedding",), False)],
          "lm_head": [("lm_head.weight", ("lm_head",), True)],
          "norms": [("model.norm.weight", ("final_norm", "scale"), False)]}
_LAYER_NORMS = (("input_layernorm.weight", ("layers", "attn_norm", "scale")),
                ("post_attention_layernorm.weight", ("layers", "mlp_norm", "scale")))
_MODULES_TO_SAVE = {"embedding": ["embed_tokens"], "lm_head": ["lm_head"],
                    "norms": ["input_layernorm", "post_attention_layernorm", "norm"]}
META_TARGETS = "jaxllm_targets"  # in the safetensors metadata: jaxllm's own targets, for an exact re-import


def _a_to_peft(a):     # [in..., r] → [r, in]
    return np.ascontiguousarray(a.reshape(-1, a.shape[-1]).T)


def _b_to_peft(b):     # [r, out...] → [out, r]
    return np.ascontiguousarray(b.reshape(b.shape[0], -1).T)


def _module(cfg: ModelConfig, target: str) -> str:
    return W_PACK if cfg.family in BAICHUAN_FAMILIES and target in ("q", "k", "v") else _LLAMA_MODULES[target]


# ---------------------------------------------------------------------------------------------------------
# Export

def peft_tensors(cfg: ModelConfig, leaves: dict, train=()) -> tuple[dict, dict]:
    """({PEFT key: array}, adapter_config.json) of a jaxllm adapter: `leaves` maps layer-stacked paths
    (layers/attn/wq_lora_a, ...) and the `train`ed base weights to numpy arrays."""
    spec = cfg.lora
    out, modules, rank_pattern, alpha_pattern = {}, set(), {}, {}
    qkv = [t for t in ("q", "k", "v") if t in spec.targets] or (["q", "k", "v"] if "qkv" in spec.targets else [])
    for i in range(cfg.num_layers):
        pre = f"{PREFIX}model.layers.{i}."
        get = lambda t, ab: leaves[("layers", _LEAF[t][0], f"{_LEAF[t][1]}_lora_{ab}")][i]
        shared = leaves[("layers", "attn", "wqkv_lora_a")][i] if "qkv" in spec.targets else None
        for t in ("q", "k", "v", "o", "gate", "up", "down"):
            if t in ("q", "k", "v") and cfg.family in BAICHUAN_FAMILIES:
                continue
            if t not in spec.targets and not (t in qkv and shared is not None):
                continue
            a = shared if t in qkv and shared is not None else get(t, "a")
            out[pre + _LLAMA_MODULES[t] + ".lora_A.weight"] = _a_to_peft(a)
            out[pre + _LLAMA_MODULES[t] + ".lora_B.weight"] = _b_to_peft(get(t, "b"))
            modules.add(_LLAMA_MODULES[t].split(".")[-1])
        if cfg.family in BAICHUAN_FAMILIES and qkv:
            h = cfg.hidden_size
            if shared is not None:  # PEFT's own W_pack adapter: one A, B stacked q | k | v
                a_peft = _a_to_peft(shared)
                b_peft = np.concatenate([_b_to_peft(get(t, "b")) for t in qkv], axis=0)
            else:  # rank c·r block adapter: A stacked, B block-diagonal (zero blocks for unadapted projections)
                r = spec.rank
                a_peft = np.concatenate([_a_to_peft(get(t, "a")) for t in qkv], axis=0)
                b_peft = np.zeros((3 * h, len(qkv) * r), a_peft.dtype)
                for j, t in enumerate(qkv):
                    row = ("q", "k", "v").index(t) * h
                    b_peft[row:row + h, j * r:(j + 1) * r] = _b_to_peft(get(t, "b"))
                if len(qkv) > 1:
                    rank_pattern["W_pack"] = len(qkv) * r
                    alpha_pattern["W_pack"] = len(qkv) * spec.alpha  # the same alpha/rank
            out[pre + W_PACK + ".lora_A.weight"] = a_peft
            out[pre + W_PACK + ".lora_B.weight"] = b_peft
            modules.add("W_pack")
    saved = []
    for group in train:
        saved += _MODULES_TO_SAVE[group]
        for key, path, transpose in _SAVED[group]:
            out[PREFIX + key] = np.ascontiguousarray(leaves[path].T if transpose else leaves[path])
        if group == "norms":
            for i in range(cfg.num_layers):
                for key, path in _LAYER_NORMS:
                    out[f"{PREFIX}model.layers.{i}.{key}"] = np.ascontiguousarray(leaves[path][i])
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None, "r": spec.rank,
              "lora_alpha": spec.alpha, "lora_dropout": spec.dropout, "target_modules": sorted(modules),
              "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "bias": "none",
              "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
              "inference_mode": True, "modules_to_save": saved or None, "layers_to_transform": None,
              "layers_pattern": None, "revision": None}
    return out, config


def write_peft(directory: str | Path, cfg: ModelConfig, leaves: dict, train=()) -> None:
    """A PEFT adapter directory (adapter_config.json + adapter_model.safetensors) that
    `peft.PeftModel.from_pretrained(model, directory)` loads onto the HF export of the base."""
    from safetensors.numpy import save_file

    from jaxllm.convert.core import check_destination
    from jaxllm.storage import staging_dir

    dst = Path(directory)
    check_destination(dst)
    tensors, config = peft_tensors(cfg, leaves, train)
    staging = staging_dir(dst)
    try:
        save_file({k: v.astype(np.float32) for k, v in tensors.items()}, str(staging / "adapter_model.safetensors"),
                  metadata={"format": "pt", META_TARGETS: ",".join(cfg.lora.targets)})
        (staging / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        staging.rename(dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------
# Import

def _read_tensors(directory: Path) -> tuple[dict, dict]:
    st, binary = directory / "adapter_model.safetensors", directory / "adapter_model.bin"
    if st.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(st), "np") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
        except Exception as err:  # noqa: BLE001 - safetensors raises its own types for bad headers
            raise ConversionError(f"{st}: unreadable safetensors file ({str(err).splitlines()[0][:200]})") from None
    if binary.is_file():
        import torch

        state = torch.load(binary, map_location="cpu", weights_only=True)  # never runs code from the pickle
        return {k: v.float().numpy() for k, v in state.items()}, {}
    raise ConversionError(f"{directory}: no adapter_model.safetensors (or adapter_model.bin)")


def _strip(key: str) -> str:
    """PEFT key → HF key without the adapter wrapping (`base_model.model.`, `.default`, `modules_to_save`)."""
    key = key[len(PREFIX):] if key.startswith(PREFIX) else key
    return key.replace(".modules_to_save.default.", ".").replace(".modules_to_save.", ".").replace(
        ".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")


def _pattern_value(patterns: dict, module_key: str, default):
    for pattern, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?{pattern}", module_key):
            return value
    return default


def read_peft(directory: str | Path, base: ModelConfig) -> tuple[ModelConfig, dict, list]:
    """(adapted config, {jaxllm path: float32 numpy}, trained base weight groups) of a PEFT LoRA adapter
    for the model `base`. Unsupported variants (DoRA, biases, fan_in_fan_out, other PEFT types) are
    refused by name."""
    directory = Path(directory)
    where = directory / "adapter_config.json"
    try:
        pc = json.loads(where.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConversionError(f"{where}: unreadable ({err})") from None
    if pc.get("peft_type") != "LORA":
        raise ConversionError(f"{where}: peft_type {pc.get('peft_type')!r}; only LORA adapters convert")
    for key, ok in (("use_dora", False), ("fan_in_fan_out", False), ("bias", "none")):
        if pc.get(key, ok) not in (ok, None):
            raise ConversionError(f"{where}: {key}={pc[key]!r} is not supported (jaxllm adapters are plain LoRA "
                                  f"without biases)")
    tensors, metadata = _read_tensors(directory)
    tensors = {_strip(k): v for k, v in tensors.items()}
    base = base.replace(lora=None)
    baichuan = base.family in BAICHUAN_FAMILIES
    modules = {"W_pack": W_PACK} if baichuan else {}
    modules.update({m.split(".")[-1]: m for t, m in _LLAMA_MODULES.items() if not (baichuan and t in "qkv")})
    by_target: dict[str, list] = {}
    for name, module in modules.items():
        found = [i for i in range(base.num_layers) if f"model.layers.{i}.{module}.lora_A.weight" in tensors]
        if found:
            by_target[name] = found
    if not by_target:
        raise ConversionError(f"{directory}: no LoRA tensors for the {base.family} modules "
                              f"({', '.join(modules)}); does the adapter belong to this model?")
    # per module: rank, scale (alpha/r, or alpha/sqrt(r) with rsLoRA), and its layer tensors
    r0, alpha0 = int(pc.get("r", 8)), float(pc.get("lora_alpha", 8))
    pieces = {}
    for name, layers in by_target.items():
        module = modules[name]
        a = {i: tensors.pop(f"model.layers.{i}.{module}.lora_A.weight").astype(np.float32) for i in layers}
        b = {i: tensors.pop(f"model.layers.{i}.{module}.lora_B.weight").astype(np.float32) for i in layers}
        rank = a[layers[0]].shape[0]
        alpha = float(_pattern_value(pc.get("alpha_pattern"), f"model.layers.{layers[0]}.{module}", alpha0))
        if _pattern_value(pc.get("rank_pattern"), f"model.layers.{layers[0]}.{module}", r0) != rank:
            raise ConversionError(f"{directory}: {module} has rank {rank} but the config says "
                                  f"{_pattern_value(pc.get('rank_pattern'), module, r0)}")
        scale = alpha / math.sqrt(rank) if pc.get("use_rslora") else alpha / rank
        pieces[name] = (rank, scale, a, b, alpha)
    # jaxllm targets with their A [in, r] and B [r, out] per layer
    h, n, kv, d = base.hidden_size, base.num_heads, base.num_kv_heads, base.head_dim
    outs = {"q": (n, d), "k": (kv, d), "v": (kv, d), "o": (h,), "gate": (base.intermediate_size,),
            "up": (base.intermediate_size,), "down": (h,)}
    ins = {"q": (h,), "k": (h,), "v": (h,), "o": (n, d), "gate": (h,), "up": (h,), "down": (base.intermediate_size,)}
    adapters = {}  # target -> (rank, scale, {layer: A}, {layer: B}); "qkv" shares A
    for name, (rank, scale, a, b, _) in pieces.items():
        if name != "W_pack":
            target = next(t for t, m in _LLAMA_MODULES.items() if m.endswith(name))
            adapters[target] = (rank, scale, {i: x.T.reshape(*ins[target], rank) for i, x in a.items()},
                                {i: x.T.reshape(rank, *outs[target]) for i, x in b.items()})
            continue
        separate = [t for t in metadata.get(META_TARGETS, "").split(",") if t in ("q", "k", "v")]
        sub = rank // len(separate) if separate and rank % len(separate) == 0 else 0
        blocks = sub and all(_block_diagonal(x, separate, h, sub) for x in b.values())
        if blocks:  # jaxllm's own export of separate adapters: undo the block layout
            for j, t in enumerate(separate):
                row = ("q", "k", "v").index(t) * h
                adapters[t] = (sub, scale, {i: x[j * sub:(j + 1) * sub].T.reshape(h, sub) for i, x in a.items()},
                               {i: x[row:row + h, j * sub:(j + 1) * sub].T.reshape(sub, n, d) for i, x in b.items()})
        else:
            adapters["qkv"] = (rank, scale, {i: x.T for i, x in a.items()},
                               {i: x.T.reshape(rank, 3, n, d) for i, x in b.items()})
    rank = max(v[0] for v in adapters.values())
    scale = next(iter(adapters.values()))[1]
    # alpha as PEFT wrote it when that gives the same scale at this rank (bit-exact), else scale · rank
    alphas = [alpha for r, _, _, _, alpha in pieces.values() if r == rank]
    alpha = alphas[0] if alphas and not pc.get("use_rslora") and alphas[0] / rank == scale else scale * rank
    leaves = {}
    for target, (r, s, a, b) in adapters.items():
        # ranks below the largest are padded with zeros and other scales folded into B: the same product
        a_name, b_names = ("wqkv", ("wq", "wk", "wv")) if target == "qkv" else (_LEAF[target][1], (_LEAF[target][1],))
        group = _LEAF["q" if target == "qkv" else target][0]
        a_in = ins["q" if target == "qkv" else target]
        stacked_a = np.zeros((base.num_layers, *a_in, rank), np.float32)
        for i, x in a.items():
            stacked_a[i, ..., :r] = x
        leaves[("layers", group, f"{a_name}_lora_a")] = stacked_a
        for j, b_name in enumerate(b_names):
            out_shape = outs[b_name[1:] if target == "qkv" else target]
            stacked_b = np.zeros((base.num_layers, rank, *out_shape), np.float32)
            for i, x in b.items():
                value = x[:, j] if target == "qkv" else x
                stacked_b[i, :r] = value if s == scale else value * np.float32(s / scale)
            leaves[("layers", group, f"{b_name}_lora_b")] = stacked_b
    if "qkv" in metadata.get(META_TARGETS, "").split(",") and not baichuan:
        _share_qkv(leaves, adapters)  # jaxllm's shared-A adapter, exported as three copies of A
    train = _modules_to_save(tensors, base, leaves, directory)
    spec = LoraSpec(rank=rank, alpha=alpha, dropout=float(pc.get("lora_dropout") or 0.0),
                    targets=tuple(adapters))
    return base.replace(lora=spec), leaves, train


def _share_qkv(leaves: dict, adapters: dict) -> None:
    keys = [("layers", "attn", f"w{t}_lora_a") for t in "qkv"]
    if all(k in leaves for k in keys) and all(np.array_equal(leaves[keys[0]], leaves[k]) for k in keys[1:]):
        leaves[("layers", "attn", "wqkv_lora_a")] = leaves.pop(keys[0])
        for k in keys[1:]:
            del leaves[k]
        adapters["qkv"] = adapters.pop("q")
        del adapters["k"], adapters["v"]


def _block_diagonal(b: np.ndarray, separate, h: int, sub: int) -> bool:
    """B [3H, c·sub] has nonzeros only in the (projection, its columns) blocks of jaxllm's export."""
    mask = np.zeros(b.shape, bool)
    for j, t in enumerate(separate):
        row = ("q", "k", "v").index(t) * h
        mask[row:row + h, j * sub:(j + 1) * sub] = True
    return not np.any(b[~mask])


def _modules_to_save(tensors: dict, base: ModelConfig, leaves: dict, directory: Path) -> list:
    """Whole base weights the adapter carries (PEFT's modules_to_save) → `leaves`; their lora.train groups."""
    train = []
    for group, items in _SAVED.items():
        present = [key for key, _, _ in items if key in tensors]
        if not present:
            continue
        for key, path, transpose in items:
            value = tensors.pop(key).astype(np.float32)
            leaves[path] = np.ascontiguousarray(value.T) if transpose else value
        if group == "norms":
            for key, path in _LAYER_NORMS:
                layer_keys = [f"model.layers.{i}.{key}" for i in range(base.num_layers)]
                if not all(k in tensors for k in layer_keys):
                    raise ConversionError(f"{directory}: the adapter saves some norms but not {layer_keys[0]}; "
                                          f"jaxllm trains all norms or none")
                leaves[path] = np.stack([tensors.pop(k).astype(np.float32) for k in layer_keys])
        train.append(group)
    if tensors:
        raise ConversionError(f"{directory}: tensor {sorted(tensors)[0]} has no place in a jaxllm {base.family} "
                              f"adapter")
    return train
