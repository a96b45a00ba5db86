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
import shutil
from pathlib import Path

import numpy as np

from jaxllm.config import LoraSpec, ModelConfig
from jaxllm.convert.mapping import BAICHUAN_FAMILIES
from jaxllm.convert.readers import ConversionError
from jaxllm.lora.peft_config import module_rank_alpha, most_common, patterns, refuse_unsupported, targets_module

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

def _layer_key(i: int, module: str) -> str:
    return f"model.layers.{i}.{module}"


def peft_tensors(cfg: ModelConfig, leaves: dict, train=(), base_name: str | None = None) -> tuple[dict, dict]:
    """({PEFT key: array}, adapter_config.json) of a jaxllm adapter: `leaves` maps layer-stacked paths
    (layers/attn/wq_lora_a, ...) and the `train`ed base weights to numpy arrays. Each layer's adapter is
    written at its own rank (the zero padding of the stacked arrays dropped), its rank and alpha in
    `rank_pattern` / `alpha_pattern` where they differ from the most common `r` / `lora_alpha`."""
    spec, n_layers = cfg.lora, cfg.num_layers
    out, values = {}, {}  # values: {module key: (r, alpha)}
    qkv = [t for t in ("q", "k", "v") if t in spec.targets] or (["q", "k", "v"] if "qkv" in spec.targets else [])
    shared_target = "qkv" in spec.targets
    baichuan = cfg.family in BAICHUAN_FAMILIES
    if baichuan and qkv and not shared_target and any(t in dict(spec.layer_ranks) or t in dict(spec.layer_alphas)
                                                      for t in qkv):
        raise ConversionError("per-layer ranks or alphas on separate q/k/v adapters do not export to W_pack")

    def put(i, module, a, b, rank, alpha):
        key = _layer_key(i, module)
        out[PREFIX + key + ".lora_A.weight"] = _a_to_peft(a[..., :rank])
        out[PREFIX + key + ".lora_B.weight"] = _b_to_peft(b[:rank])
        values[key] = (rank, alpha)

    for i in range(n_layers):
        get = lambda t, ab: leaves[("layers", _LEAF[t][0], f"{_LEAF[t][1]}_lora_{ab}")][i]
        shared = leaves[("layers", "attn", "wqkv_lora_a")][i] if shared_target else None
        for t in ("q", "k", "v", "o", "gate", "up", "down"):
            if t in ("q", "k", "v") and baichuan:
                continue
            if t not in spec.targets and not (t in qkv and shared is not None):
                continue
            owner = "qkv" if t in qkv and shared is not None else t
            rank, alpha = spec.ranks(owner, n_layers)[i], spec.alphas(owner, n_layers)[i]
            if rank:
                put(i, _LLAMA_MODULES[t], shared if owner == "qkv" else get(t, "a"), get(t, "b"), rank, alpha)
        if baichuan and qkv:
            h = cfg.hidden_size
            if shared is not None:  # PEFT's own W_pack adapter: one A, B stacked q | k | v
                rank, alpha = spec.ranks("qkv", n_layers)[i], spec.alphas("qkv", n_layers)[i]
                if rank:
                    b = np.concatenate([get(t, "b")[:rank].reshape(rank, -1) for t in qkv], axis=1)
                    put(i, W_PACK, shared, b, rank, alpha)
                continue
            # rank c·r block adapter: A stacked, B block-diagonal (zero blocks for unadapted projections)
            r = spec.rank
            a_peft = np.concatenate([_a_to_peft(get(t, "a")) for t in qkv], axis=0)
            b_peft = np.zeros((3 * h, len(qkv) * r), a_peft.dtype)
            for j, t in enumerate(qkv):
                row = ("q", "k", "v").index(t) * h
                b_peft[row:row + h, j * r:(j + 1) * r] = _b_to_peft(get(t, "b"))
            key = _layer_key(i, W_PACK)
            out[PREFIX + key + ".lora_A.weight"] = a_peft
            out[PREFIX + key + ".lora_B.weight"] = b_peft
            values[key] = (len(qkv) * r, len(qkv) * spec.alpha)  # the same alpha/rank
    config = _peft_config(cfg, values, train, base_name)
    for group in train:
        for key, path, transpose in _SAVED[group]:
            out[PREFIX + key] = np.ascontiguousarray(leaves[path].T if transpose else leaves[path])
        if group == "norms":
            for i in range(n_layers):
                for key, path in _LAYER_NORMS:
                    out[f"{PREFIX}model.layers.{i}.{key}"] = np.ascontiguousarray(leaves[path][i])
    return out, config


def _short_or_full(values: dict, n_layers: int) -> dict:
    """{module name (q_proj, W_pack, ...): the same value in all layers} or {module key: value}."""
    by_name: dict = {}
    for key, value in values.items():
        by_name.setdefault(key.split(".")[-1], {})[key] = value
    out = {}
    for name, per_key in by_name.items():
        if len(per_key) == n_layers and len(set(per_key.values())) == 1:
            out[name] = next(iter(per_key.values()))
        else:
            out.update(per_key)
    return out


def _peft_config(cfg: ModelConfig, values: dict, train, base_name) -> dict:
    spec, n_layers = cfg.lora, cfg.num_layers
    r = most_common([v[0] for v in values.values()]) if values else spec.rank
    alpha = most_common([v[1] for v in values.values()]) if values else spec.alpha
    by_module: dict = {}
    for key in values:
        by_module.setdefault(key.split(".")[-1], []).append(key)
    targets = set()
    for name, keys in by_module.items():
        targets.update([name] if len(keys) == n_layers else keys)
    ranks = _short_or_full({k: v[0] for k, v in values.items()}, n_layers)
    alphas = _short_or_full({k: v[1] for k, v in values.items()}, n_layers)
    saved = [m for group in train for m in _MODULES_TO_SAVE[group]]
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name, "r": r,
            "lora_alpha": alpha, "lora_dropout": spec.dropout, "target_modules": sorted(set(targets)),
            "rank_pattern": patterns(ranks, r), "alpha_pattern": patterns(alphas, alpha), "bias": "none",
            "fan_in_fan_out": False, "use_rslora": spec.rslora, "use_dora": False, "init_lora_weights": True,
            "inference_mode": True, "modules_to_save": saved or None, "layers_to_transform": None,
            "layers_pattern": None, "revision": None}


def write_peft(directory: str | Path, cfg: ModelConfig, leaves: dict, train=(), base_name: str | None = None,
               score=None, dtype: str | None = None) -> None:
    """A PEFT adapter directory (adapter_config.json + adapter_model.safetensors) that
    `peft.PeftModel.from_pretrained(model, directory)` loads onto the HF export of the base. `score`: a reward
    model's head [embed]; then the adapter is PEFT's SEQ_CLS one, for `LlamaForSequenceClassification`
    (num_labels 1), the head in `modules_to_save`. `dtype`: the tensors' (default float32; an imported adapter's
    own, recorded at import, so a round trip is bit-identical)."""
    from safetensors.numpy import save_file

    from jaxllm.convert.core import check_destination
    from jaxllm.storage import staging_dir

    dst = Path(directory)
    check_destination(dst)
    tensors, config = peft_tensors(cfg, leaves, train, base_name)
    if score is not None:
        tensors[PREFIX + "score.weight"] = np.asarray(score, np.float32)[None, :]
        config = {**config, "task_type": "SEQ_CLS", "modules_to_save": [*(config["modules_to_save"] or []), "score"]}
    staging = staging_dir(dst)
    try:
        import ml_dtypes

        kind = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype or "float32")
        save_file({k: v.astype(kind) for k, v in tensors.items()}, str(staging / "adapter_model.safetensors"),
                  metadata={"format": "pt", META_TARGETS: ",".join(cfg.lora.targets)})
        (staging / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        staging.rename(dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------
# Import

_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def stored_dtype(directory: str | Path) -> str | None:
    """The one dtype of a PEFT adapter's safetensors tensors (float32, float16, bfloat16), else None (mixed,
    unreadable, or a .bin file): what an export writes back."""
    path = Path(directory) / "adapter_model.safetensors"
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size)) if size < 2**26 else {}
    except (OSError, ValueError):
        return None
    kinds = {v.get("dtype") for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}
    return _DTYPES.get(kinds.pop()) if len(kinds) == 1 else None


def _read_tensors(directory: Path) -> tuple[dict, dict]:
    st, binary = directory / "adapter_model.safetensors", directory / "adapter_model.bin"
    if st.is_file():
        from safetensors import safe_open

        try:  # numpy has no bfloat16: such files are read through JAX (ml_dtypes), values unchanged
            with safe_open(str(st), "flax" if stored_dtype(directory) == "bfloat16" else "np") as f:
                return {k: np.asarray(f.get_tensor(k)) for k in f.keys()}, f.metadata() or {}
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


def _refuse_tensors(tensors: dict, where) -> None:
    for key in tensors:
        if ".lora_embedding_A" in key or ".lora_embedding_B" in key:
            raise ConversionError(f"{where}: {key}: LoRA on an embedding (lora_embedding_A/B) is not supported")
        if key.endswith(".lora_B.bias"):
            raise ConversionError(f"{where}: lora_bias=True is not supported ({key}: a bias on lora_B)")
        if "lora_magnitude_vector" in key:
            raise ConversionError(f"{where}: use_dora=True is not supported ({key}: DoRA's magnitude vector)")


def _module_table(base: ModelConfig) -> dict:
    """{PEFT module name: module path in a layer} of the base's adapted Linear layers."""
    baichuan = base.family in BAICHUAN_FAMILIES
    modules = {"W_pack": W_PACK} if baichuan else {}
    modules.update({m.split(".")[-1]: m for t, m in _LLAMA_MODULES.items() if not (baichuan and t in "qkv")})
    return modules


def _targeted(pc: dict, base: ModelConfig, modules: dict, tensors: dict, where) -> dict:
    """{module name: [layers]} the config targets (as PEFT matches it), checked against the file's tensors."""
    keys = {_layer_key(i, m): (name, i) for name, m in modules.items() for i in range(base.num_layers)}
    for other in ("model.embed_tokens", "lm_head"):
        if targets_module(pc, other, set(keys)):
            field = "target_modules" if other == "lm_head" else "target_modules (lora_embedding_A/B)"
            raise ConversionError(f"{where}: {field}={pc.get('target_modules')!r} adapts {other}; LoRA on "
                                  f"{other.split('.')[-1]} is not supported")
    found: dict = {}
    for key, (name, i) in keys.items():
        present = f"{key}.lora_A.weight" in tensors and f"{key}.lora_B.weight" in tensors
        wanted = targets_module(pc, key, set(keys))
        if wanted != present:
            raise ConversionError(f"{where}: target_modules={pc.get('target_modules')!r} "
                                  f"{'targets' if wanted else 'does not target'} {key}, but the weights "
                                  f"{'lack' if wanted else 'hold'} its lora_A/lora_B")
        if present:
            found.setdefault(name, []).append(i)
    return found


def read_peft(directory: str | Path, base: ModelConfig) -> tuple[ModelConfig, dict, list]:
    """(adapted config, {jaxllm path: float32 numpy}, trained base weight groups) of a PEFT LoRA adapter
    for the model `base`, each module at the rank and alpha PEFT gives it (`jaxllm.lora.peft_config`).
    Anything but plain LoRA is refused, by field and value."""
    directory = Path(directory)
    where = directory / "adapter_config.json"
    try:
        pc = json.loads(where.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConversionError(f"{where}: unreadable ({err})") from None
    refuse_unsupported(pc, where)
    tensors, metadata = _read_tensors(directory)
    tensors = {_strip(k): v for k, v in tensors.items()}
    _refuse_tensors(tensors, directory)
    base = base.replace(lora=None)
    n_layers, baichuan = base.num_layers, base.family in BAICHUAN_FAMILIES
    modules = _module_table(base)
    by_target = _targeted(pc, base, modules, tensors, where)
    if not by_target:
        raise ConversionError(f"{directory}: no LoRA tensors for the {base.family} modules "
                              f"({', '.join(modules)}); does the adapter belong to this model?")
    # per module: per-layer rank and alpha (0 / default where the layer has none), and its layer tensors
    alpha0 = float(pc.get("lora_alpha", 8))
    pieces = {}
    for name, layers in by_target.items():
        module = modules[name]
        a = {i: tensors.pop(f"{_layer_key(i, module)}.lora_A.weight").astype(np.float32) for i in layers}
        b = {i: tensors.pop(f"{_layer_key(i, module)}.lora_B.weight").astype(np.float32) for i in layers}
        ranks, alphas = [0] * n_layers, [alpha0] * n_layers
        for i in layers:
            r, alpha = module_rank_alpha(pc, _layer_key(i, module))
            if a[i].shape[0] != r or b[i].shape[1] != r:
                raise ConversionError(f"{where}: {_layer_key(i, module)} has rank {a[i].shape[0]} but "
                                      f"r/rank_pattern give it {r}")
            ranks[i], alphas[i] = r, alpha
        pieces[name] = (ranks, alphas, a, b)
    h, n, kv, d = base.hidden_size, base.num_heads, base.num_kv_heads, base.head_dim
    outs = {"q": (n, d), "k": (kv, d), "v": (kv, d), "o": (h,), "gate": (base.intermediate_size,),
            "up": (base.intermediate_size,), "down": (h,)}
    ins = {"q": (h,), "k": (h,), "v": (h,), "o": (n, d), "gate": (h,), "up": (h,), "down": (base.intermediate_size,)}
    adapters = {}  # target -> (ranks, alphas, {layer: A}, {layer: B}); "qkv" shares A
    for name, (ranks, alphas, a, b) in pieces.items():
        if name != "W_pack":
            target = next(t for t, m in _LLAMA_MODULES.items() if m.endswith(name))
            adapters[target] = (ranks, alphas, {i: x.T.reshape(*ins[target], -1) for i, x in a.items()},
                                {i: x.T.reshape(-1, *outs[target]) for i, x in b.items()})
            continue
        separate = [t for t in metadata.get(META_TARGETS, "").split(",") if t in ("q", "k", "v")]
        c = len(separate)
        blocks = c and not pc.get("use_rslora") and len(set(ranks[i] for i in a)) == 1 and all(
            ranks[i] % c == 0 and _block_diagonal(x, separate, h, ranks[i] // c) for i, x in b.items())
        if blocks:  # jaxllm's own export of separate adapters: undo the block layout
            sub = {i: ranks[i] // c for i in a}
            for j, t in enumerate(separate):
                row = ("q", "k", "v").index(t) * h
                adapters[t] = ([r // c for r in ranks], [al / c for al in alphas],
                               {i: x[j * sub[i]:(j + 1) * sub[i]].T.reshape(h, -1) for i, x in a.items()},
                               {i: x[row:row + h, j * sub[i]:(j + 1) * sub[i]].T.reshape(-1, n, d)
                                for i, x in b.items()})
        else:
            adapters["qkv"] = (ranks, alphas, {i: x.T for i, x in a.items()},
                               {i: x.T.reshape(-1, 3, n, d) for i, x in b.items()})
    rank = max(max(v[0]) for v in adapters.values())
    leaves = {}
    for target, (ranks, _, a, b) in adapters.items():
        # every layer padded with exact zeros to the largest rank; its own scale in the spec's tables
        a_name, b_names = ("wqkv", ("wq", "wk", "wv")) if target == "qkv" else (_LEAF[target][1], (_LEAF[target][1],))
        group = _LEAF["q" if target == "qkv" else target][0]
        stacked_a = np.zeros((n_layers, *ins["q" if target == "qkv" else target], rank), np.float32)
        for i, x in a.items():
            stacked_a[i, ..., :ranks[i]] = x
        leaves[("layers", group, f"{a_name}_lora_a")] = stacked_a
        for j, b_name in enumerate(b_names):
            stacked_b = np.zeros((n_layers, rank, *outs[b_name[1:] if target == "qkv" else target]), np.float32)
            for i, x in b.items():
                stacked_b[i, :ranks[i]] = x[:, j] if target == "qkv" else x
            leaves[("layers", group, f"{b_name}_lora_b")] = stacked_b
    if "qkv" in metadata.get(META_TARGETS, "").split(",") and not baichuan:
        _share_qkv(leaves, adapters)  # jaxllm's shared-A adapter, exported as three copies of A
    train = _modules_to_save(tensors, base, leaves, directory)
    spec = LoraSpec(rank=rank, alpha=alpha0, dropout=float(pc.get("lora_dropout") or 0.0), targets=tuple(adapters),
                    rslora=bool(pc.get("use_rslora")), **_tables(adapters, rank, alpha0, n_layers))
    return base.replace(lora=spec), leaves, train


def _tables(adapters: dict, rank: int, alpha: float, n_layers: int) -> dict:
    """LoraSpec's layer_ranks / layer_alphas: the targets whose layers differ from (rank, alpha)."""
    ranks, alphas = [], []
    for target, (r, a, _, _) in adapters.items():
        a = [x if ri else alpha for x, ri in zip(a, r)]
        if list(r) != [rank] * n_layers:
            ranks.append((target, tuple(r)))
        if a != [alpha] * n_layers:
            alphas.append((target, tuple(a)))
    return {"layer_ranks": tuple(ranks), "layer_alphas": tuple(alphas)}


def _share_qkv(leaves: dict, adapters: dict) -> None:
    keys = [("layers", "attn", f"w{t}_lora_a") for t in "qkv"]
    same = all(t in adapters and adapters[t][:2] == adapters["q"][:2] for t in "qkv")
    if same and all(k in leaves for k in keys) and all(np.array_equal(leaves[keys[0]], leaves[k]) for k in keys[1:]):
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
