"""PEFT adapters as they exist in the wild, against `peft` itself: per-module ranks and alphas in every key style
PEFT matches, layers_to_transform, target_modules as a list / regex / all-linear, exclude_modules,
modules_to_save, rsLoRA and init variants, on Llama, Baichuan (W_pack) and Baichuan 2 (NormHead). Each adapter is
built with `peft.get_peft_model` (non-zero lora_B), imported with `jaxllm convert --adapter` (logits ≤ 1e-4
relative, greedy tokens identical), exported back (tensors bit-identical, `PeftModel.from_pretrained` gives the
same modules, ranks, scales and logits). Everything else is refused in one line naming the field and value,
leaving no output."""
import json

import numpy as np
import peft
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from baichuan_remote import write_release
from jaxllm.cli import main as cli
from jaxllm.convert.core import hf_to_jaxllm
from jaxllm.models import get_preset
from reference import random_hf_state_dict
from test_convert import save_baichuan, save_llama
from test_lora_peft import baichuan_torch, jax_logits, rel_err
from hf_modules import private_module_cache

TOKENS = np.random.default_rng(5).integers(3, 250, size=(2, 10))
GREEDY = 12


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{family: (root, HF-side model factory)}: Llama (3 layers, transformers), Baichuan (W_pack, the tests'
    PyTorch model) and Baichuan 2 (NormHead, remote code loaded with trust_remote_code), each converted."""
    out = {}
    root = tmp_path_factory.mktemp("llama")
    save_llama(root / "hf", get_preset("llama2-tiny").replace(num_layers=3))
    hf_to_jaxllm(root / "hf", root / "base")
    out["llama"] = root, lambda path=root / "hf": transformers.LlamaForCausalLM.from_pretrained(path).eval()
    root = tmp_path_factory.mktemp("baichuan")
    sd, cfg = save_baichuan(root / "hf", "baichuan-tiny", seed=1)
    hf_to_jaxllm(root / "hf", root / "base")
    out["baichuan"] = root, lambda: baichuan_torch(sd, cfg)
    root = tmp_path_factory.mktemp("baichuan2")
    cfg2 = get_preset("baichuan2-tiny")
    write_release(root / "hf", cfg2, random_hf_state_dict(cfg2, seed=2), "baichuan2-7b")
    hf_to_jaxllm(root / "hf", root / "base")
    cache = tmp_path_factory.mktemp("hf_modules")
    with pytest.MonkeyPatch.context() as patch:
        private_module_cache(patch, cache)
        out["baichuan2"] = root, lambda path=root / "hf": _causal(transformers.AutoModelForCausalLM.from_pretrained(
            path, trust_remote_code=True, dtype=torch.float32).eval())
        yield out


def _causal(model):
    """The tests' remote code has no generation hook, which PEFT's CAUSAL_LM wrapper asks for (upstream's has)."""
    model.prepare_inputs_for_generation = lambda *args, **kwargs: None
    return model


def _configs(attn: str, third: str) -> dict:
    """LoraConfig kwargs per case; `attn`: the attention input projection (q_proj, or Baichuan's W_pack),
    `third`: the last layer index (per-layer keys on two different layers: 0 and 1 or 2)."""
    return {
        "alpha-pattern-per-layer": dict(r=4, lora_alpha=8, target_modules=[attn, "o_proj", "down_proj"],
                                        alpha_pattern={f"model.layers.1.self_attn.{attn}": 32,
                                                       "model.layers.0.mlp.down_proj": 3}),
        "rank-pattern-per-layer": dict(r=4, lora_alpha=8, target_modules=[attn, "o_proj", "down_proj"],
                                       rank_pattern={f"model.layers.{third}.self_attn.o_proj": 8,
                                                     "model.layers.0.mlp.down_proj": 2}),
        "pattern-key-styles": dict(r=3, lora_alpha=6, target_modules="all-linear",
                                   rank_pattern={attn: 5, "mlp.up_proj": 2},
                                   alpha_pattern={"self_attn.o_proj": 5, r"layers\.1\.mlp\.gate_proj": 7}),
        "layers-to-transform": dict(r=4, lora_alpha=4, target_modules=[attn, "o_proj", "up_proj"],
                                    layers_to_transform=[0, int(third)], layers_pattern="layers"),
        "target-regex": dict(r=2, lora_alpha=5,
                             target_modules=rf".*\.layers\.[01]\.(self_attn\.({attn}|o_proj)|mlp\.down_proj)"),
        "all-linear-exclude-save": dict(r=2, lora_alpha=4, target_modules="all-linear",
                                        exclude_modules=["down_proj"], modules_to_save=["lm_head"]),
        "rslora-gaussian": dict(r=4, lora_alpha=8, use_rslora=True, init_lora_weights="gaussian",
                                target_modules=[attn, "gate_proj"], rank_pattern={"model.layers.0.mlp.gate_proj": 16}),
        "init-false-dropout": dict(r=2, lora_alpha=2, lora_dropout=0.1, init_lora_weights=False,
                                   target_modules=["o_proj", "up_proj"]),
    }


# the default run: every configuration on Llama but two, the per-layer patterns on both Baichuan layouts; the
# rest under `-m slow` (each case is 3-12 s on 2 cores)
SLOW = {("llama", "all-linear-exclude-save"), ("llama", "init-false-dropout"), ("baichuan", "pattern-key-styles"),
        ("baichuan", "layers-to-transform"), ("baichuan", "all-linear-exclude-save"), ("baichuan2", "target-regex")}
CASES = [pytest.param(f, c, id=f"{f}-{c}", marks=[pytest.mark.slow] if (f, c) in SLOW else [])
         for f, c in [("llama", c) for c in _configs("q", "0")] + [
             ("baichuan", c) for c in ("alpha-pattern-per-layer", "rank-pattern-per-layer", "pattern-key-styles",
                                       "layers-to-transform", "all-linear-exclude-save")] + [
             ("baichuan2", c) for c in ("alpha-pattern-per-layer", "rank-pattern-per-layer", "target-regex")]]


def _peft_adapter(model, kwargs, directory, seed=0):
    model = peft.get_peft_model(model, peft.LoraConfig(**kwargs))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:  # B starts at zero: make the adapter do something
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory)
    return model.eval()


def _logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(tokens)).logits.float().numpy()


def _greedy(model, prompt):
    tokens = prompt[None]
    for _ in range(GREEDY):
        tokens = np.concatenate([tokens, _logits(model, tokens)[:, -1].argmax(-1)[:, None]], axis=1)
    return tokens


def _lora_layers(model):
    """{module name: (r, scaling)} of every LoRA layer of a PEFT model."""
    return {name.split("base_model.model.")[-1]: (m.r["default"], m.scaling["default"])
            for name, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}


@pytest.mark.parametrize("family,case", CASES)
def test_peft_adapter_imports_exactly_and_exports_back_bit_identical(family, case, models, tmp_path):
    root, hf_model = models[family]
    attn = "q_proj" if family == "llama" else "W_pack"
    kwargs = _configs(attn, "2" if family == "llama" else "1")[case]
    if family == "llama" and isinstance(kwargs["target_modules"], list) and attn in kwargs["target_modules"] \
            and case != "rslora-gaussian":
        kwargs["target_modules"] = [*kwargs["target_modules"], "v_proj"]
    if family == "llama" and case == "rank-pattern-per-layer":  # the crash: a per-layer v_proj rank
        kwargs["rank_pattern"] = {**kwargs["rank_pattern"], "model.layers.1.self_attn.v_proj": 8}
    model = _peft_adapter(hf_model(), kwargs, tmp_path / "peft")
    expected = _logits(model, TOKENS)
    prompt = TOKENS[0, :4]
    greedy = _greedy(model, prompt)

    assert cli(["convert", "--from", "hf", "--to", "jaxllm", str(tmp_path / "peft"), str(tmp_path / "jx"),
                "--adapter", "--base", str(root / "base")]) == 0
    ours = jax_logits(root / "base", adapter=tmp_path / "jx", tokens=TOKENS)
    error = rel_err(ours, expected)
    plain = rel_err(jax_logits(root / "base", tokens=TOKENS), expected)
    # greedy decoding: every generated token is jaxllm's argmax after the same prefix
    ours_greedy = jax_logits(root / "base", adapter=tmp_path / "jx", tokens=greedy[:, :-1]).argmax(-1)
    print(f"\n  {family} {case}: jaxllm vs peft logits, relative error {error:.1e} (base alone {plain:.1e})")
    assert error < 1e-4 and plain > 1e-3
    assert np.array_equal(ours_greedy[0, len(prompt) - 1:], greedy[0, len(prompt):])

    assert cli(["convert", "--from", "jaxllm", "--to", "hf", str(tmp_path / "jx"), str(tmp_path / "back"),
                "--adapter", "--base-name", str(root / "hf")]) == 0
    original, back = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("peft", "back"))
    assert set(back) == set(original)
    assert all(np.array_equal(back[k], original[k]) for k in original)  # bit-identical
    config = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(root / "hf")
    reloaded = peft.PeftModel.from_pretrained(hf_model(), tmp_path / "back").eval()
    assert _lora_layers(reloaded) == _lora_layers(model)  # the same modules, ranks and scales
    assert np.array_equal(_logits(reloaded, TOKENS), expected)
    if family == "llama":  # base_model_name_or_path: AutoPeftModel finds the base itself
        auto = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "back").eval()
        assert np.array_equal(_logits(auto, TOKENS), expected)


# ---- refused by name, nothing written -------------------------------------------------------------------

def _edit(directory, **changes):
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


REFUSALS = {
    "dora": (lambda: peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True), {}, "use_dora=True"),
    "lora-bias": (lambda: peft.LoraConfig(r=2, target_modules=["q_proj"], lora_bias=True), {}, "lora_bias=True"),
    "embedding": (lambda: peft.LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"]), {}, "embed"),
    "fan-in-fan-out": (lambda: peft.LoraConfig(r=2, target_modules=["q_proj"]), {"fan_in_fan_out": True},
                       "fan_in_fan_out=True"),
    "layer-replication": (lambda: peft.LoraConfig(r=2, target_modules=["q_proj"]),
                          {"layer_replication": [[0, 2], [1, 3]]}, "layer_replication=[[0, 2], [1, 3]]"),
    "pissa": (lambda: peft.LoraConfig(r=2, target_modules=["q_proj"]), {"init_lora_weights": "pissa"},
              "init_lora_weights='pissa'"),
    "bias-all": (lambda: peft.LoraConfig(r=2, target_modules=["q_proj"]), {"bias": "all"}, "bias='all'"),
    "ia3": (lambda: peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]), {},
            "peft_type='IA3'"),
    "adalora": (lambda: peft.AdaLoraConfig(r=2, target_modules=["q_proj"], total_step=10), {},
                "peft_type='ADALORA'"),
    "loha": (lambda: peft.LoHaConfig(r=2, target_modules=["q_proj"]), {}, "peft_type='LOHA'"),
    "prefix-tuning": (lambda: peft.PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"), {},
                      "peft_type='PREFIX_TUNING'"),
}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_other_peft_variants_are_refused_by_name(name, models, tmp_path, capsys):
    root, hf_model = models["llama"]
    make, edits, message = REFUSALS[name]
    model = peft.get_peft_model(hf_model(), make())
    model.save_pretrained(tmp_path / "peft")
    if edits:
        _edit(tmp_path / "peft", **edits)
    capsys.readouterr()
    assert cli(["convert", "--from", "hf", "--to", "jaxllm", str(tmp_path / "peft"), str(tmp_path / "out"),
                "--adapter", "--base", str(root / "base")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peft"]  # no output, no staging left behind


def test_module_matching_is_peft_s_own():
    """jaxllm's reading of target_modules / exclude_modules / layers_to_transform and of rank/alpha patterns
    agrees with peft's functions on every module of a 12-layer model (keys like layers.1 vs layers.11)."""
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils.other import get_pattern_key

    from jaxllm.lora.peft_config import module_rank_alpha, pattern_key, targets_module

    modules = [f"model.layers.{i}.{m}" for i in range(12) for m in
               ("self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")]
    linear = set(modules)
    configs = [dict(target_modules=["q_proj", "down_proj"], layers_to_transform=[1, 11], layers_pattern="layers"),
               dict(target_modules=["self_attn.v_proj", "model.layers.2.mlp.up_proj"], layers_to_transform=3),
               dict(target_modules=r".*layers\.1\d?\.self_attn\.(q|o)_proj", exclude_modules=r".*\.11\..*"),
               dict(target_modules="all-linear", exclude_modules=["o_proj", "model.layers.0.mlp.up_proj"]),
               dict(target_modules=["q_proj", "up_proj"], modules_to_save=["up_proj"])]
    patterns = {"model.layers.1.self_attn.q_proj": 16, r"layers\.1\d\.mlp\..*": 2, "v_proj": 4, "o_proj": 6}
    for kwargs in configs:
        pc = peft.LoraConfig(r=8, lora_alpha=3, rank_pattern=patterns, alpha_pattern=patterns, **kwargs)
        if pc.target_modules == "all-linear":
            pc.target_modules = linear  # what _maybe_include_all_linear_layers makes of it
        as_json = json.loads(json.dumps({**kwargs, "r": 8, "lora_alpha": 3, "rank_pattern": patterns,
                                         "alpha_pattern": patterns}))
        for key in modules:
            assert targets_module(as_json, key, linear) == bool(check_target_module_exists(pc, key)), (kwargs, key)
            assert pattern_key(patterns, key) == get_pattern_key(list(patterns), key)
            r = pc.rank_pattern.get(get_pattern_key(pc.rank_pattern.keys(), key), pc.r)
            alpha = pc.alpha_pattern.get(get_pattern_key(pc.alpha_pattern.keys(), key), pc.lora_alpha)
            assert module_rank_alpha(as_json, key) == (r, alpha)


def test_bfloat16_adapter_imports_and_exports_back_in_bfloat16(models, tmp_path):
    """PEFT saves adapters in the model's dtype: a bfloat16 file imports (numpy has no bfloat16) and its export
    is bfloat16 again, bit-identical."""
    from safetensors.torch import load_file as load_torch, save_file as save_torch

    root, hf_model = models["llama"]
    _peft_adapter(hf_model(), dict(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"],
                                   rank_pattern={"model.layers.2.mlp.down_proj": 4}), tmp_path / "peft")
    path = tmp_path / "peft" / "adapter_model.safetensors"
    save_torch({k: v.to(torch.bfloat16) for k, v in load_torch(str(path)).items()}, str(path))
    expected = _logits(peft.PeftModel.from_pretrained(hf_model(), tmp_path / "peft").eval(), TOKENS)
    assert cli(["convert", "--from", "hf", "--to", "jaxllm", str(tmp_path / "peft"), str(tmp_path / "jx"),
                "--adapter", "--base", str(root / "base")]) == 0
    assert rel_err(jax_logits(root / "base", adapter=tmp_path / "jx", tokens=TOKENS), expected) < 1e-4
    assert cli(["convert", "--from", "jaxllm", "--to", "hf", str(tmp_path / "jx"), str(tmp_path / "back"),
                "--adapter"]) == 0
    original, back = (load_torch(str(tmp_path / d / "adapter_model.safetensors")) for d in ("peft", "back"))
    assert set(back) == set(original) and all(back[k].dtype == torch.bfloat16 for k in back)
    assert all(torch.equal(back[k], original[k]) for k in original)
