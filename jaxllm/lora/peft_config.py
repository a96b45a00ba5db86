"""PEFT's `adapter_config.json` vocabulary, read as PEFT reads it: which modules an adapter targets
(`target_modules` as a list, a regex string or `all-linear`, `exclude_modules`, `modules_to_save`,
`layers_to_transform` / `layers_pattern`) and each module's rank and alpha (`rank_pattern`, `alpha_pattern`).

The matching follows peft 0.21's own code line for line: `check_target_module_exists`
(`peft/tuners/tuners_utils.py`), `get_pattern_key` (`peft/utils/other.py`) and `LoraModel._create_and_replace`
(`peft/tuners/lora/model.py`: `rank_pattern.get(get_pattern_key(rank_pattern, key), r)`). Every other field is
either without effect on the adapted model or refused here, by name and value, in one line.
"""
from __future__ import annotations

import re

from jaxllm.convert.readers import ConversionError

# field → values that leave the model plain LoRA (anything else is refused by name)
_PLAIN = {"use_dora": (False, None), "fan_in_fan_out": (False, None), "bias": ("none", None),
          "lora_bias": (False, None), "layer_replication": (None, []), "use_qalora": (False, None),
          "target_parameters": (None, []), "trainable_token_indices": (None, [], {}),
          "alora_invocation_tokens": (None, []), "megatron_config": (None, {}), "use_bdlora": (None, {}),
          "arrow_config": (None, {}), "kasa_config": (None, {}), "velora_config": (None, {}),
          "monteclora_config": (None, {})}
_WHY = {"use_dora": "DoRA's magnitude vector", "fan_in_fan_out": "Conv1D-layout (GPT-2) weights",
        "bias": "trained base biases (jaxllm's projections have none)", "lora_bias": "a bias on lora_B",
        "layer_replication": "replicated layers", "use_qalora": "QA-LoRA's pooled input",
        "target_parameters": "LoRA on bare parameters", "trainable_token_indices": "trainable token rows"}
# init_lora_weights values that only choose how A and B start (no effect once trained); the others (pissa,
# olora, corda, loftq, lora_ga, ...) leave the base itself changed, so the adapter needs that residual base
_PLAIN_INIT = (True, False, None, "gaussian", "eva", "orthogonal")
LINEAR = "all-linear"


def refuse_unsupported(pc: dict, where) -> None:
    """ConversionError, naming the field and its value, for anything but plain LoRA."""
    if pc.get("peft_type") != "LORA":
        raise ConversionError(f"{where}: peft_type={pc.get('peft_type')!r} is not supported (only LORA adapters "
                              f"convert)")
    if pc.get("task_type") not in (None, "CAUSAL_LM"):
        raise ConversionError(f"{where}: task_type={pc['task_type']!r} is not supported (a language model's "
                              f"adapter, CAUSAL_LM, imports)")
    for key, plain in _PLAIN.items():
        if pc.get(key) not in plain:
            why = _WHY.get(key, "a LoRA variant jaxllm does not implement")
            raise ConversionError(f"{where}: {key}={pc[key]!r} is not supported ({why})")
    init = pc.get("init_lora_weights", True)
    if init not in _PLAIN_INIT and not (isinstance(init, str) and init.lower() in _PLAIN_INIT):
        raise ConversionError(f"{where}: init_lora_weights={init!r} is not supported (it changes the base weights; "
                              f"save the adapter with PEFT's path_initial_model_for_weight_conversion first)")


def pattern_key(pattern_keys, key: str) -> str:
    """peft.utils.other.get_pattern_key: the first pattern `(.*\\.)?(pattern)$` matches, else `key` itself."""
    for pattern in pattern_keys:
        if re.match(rf"(.*\.)?({pattern})$", key):
            return pattern
    return key


def module_rank_alpha(pc: dict, key: str) -> tuple[int, float]:
    """(r, lora_alpha) PEFT gives module `key` (e.g. model.layers.1.self_attn.q_proj)."""
    ranks, alphas = pc.get("rank_pattern") or {}, pc.get("alpha_pattern") or {}
    r = ranks.get(pattern_key(ranks, key), pc.get("r", 8))
    alpha = alphas.get(pattern_key(alphas, key), pc.get("lora_alpha", 8))
    return int(r), float(alpha)


def _layer_index_ok(pc: dict, key: str) -> bool:
    layer_indexes, layers_pattern = pc.get("layers_to_transform"), pc.get("layers_pattern")
    if layer_indexes is None or (isinstance(layer_indexes, list) and not layer_indexes):
        return True
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        match = None
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == layer_indexes if isinstance(layer_indexes, int) else index in layer_indexes


def targets_module(pc: dict, key: str, linear: set) -> bool:
    """peft.tuners.tuners_utils.check_target_module_exists for module `key`; `linear`: the model's Linear
    modules but the output head (what `all-linear` becomes, `_maybe_include_all_linear_layers`)."""
    exclude = pc.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return False
        elif key in exclude or any(key.endswith(f".{e}") for e in exclude):
            return False
    if any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in pc.get("modules_to_save") or ()):
        return False
    target = pc.get("target_modules")
    if target is None:
        return False
    if isinstance(target, str) and target.lower() == LINEAR:
        target = sorted(linear)
    if isinstance(target, str):
        return re.fullmatch(target, key) is not None
    if key in target:
        return True
    return any(key.endswith(f".{t}") for t in target) and _layer_index_ok(pc, key)


def patterns(values: dict, default) -> dict:
    """{module key: value} of the modules whose value differs from `default`, as PEFT pattern keys (each
    key matches only its own module: `(.*\\.)?` before a full module path)."""
    return {key: value for key, value in values.items() if value != default}


def most_common(values):
    """The most frequent value (ties: the first seen): the default r / lora_alpha a config writes."""
    counts: dict = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return max(counts, key=counts.get)
