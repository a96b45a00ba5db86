"""Conversion HF / .bin / Meta ⇄ jaxllm: exact logits, bit-exact round trips, safe and clear failures."""
import json
import os
import pickle
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import save_file

from jaxllm.checkpoint import load_params
from jaxllm.cli import main as cli
from jaxllm.convert.core import hf_to_jaxllm, jaxllm_to_hf
from jaxllm.convert.mapping import tensor_maps
from jaxllm.convert.readers import ConversionError, SafetensorsFile, open_hf, rope_unpermute
from jaxllm.inference import SamplingParams, generate
from jaxllm.models import forward, get_preset
from reference import random_hf_state_dict, reference_logits

fwd = jax.jit(forward, static_argnums=0)


def hf_llama_config(cfg):
    return transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        rms_norm_eps=cfg.rms_norm_eps, max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=False)


def save_llama(path, preset, *, seed=0, safe=True, shard=None, dtype=torch.float32):
    cfg = get_preset(preset)
    model = transformers.LlamaForCausalLM(hf_llama_config(cfg)).eval()
    sd = random_hf_state_dict(cfg, seed=seed)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
    model = model.to(dtype)
    if safe:
        model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    else:
        save_bin(model, path, shards=3 if shard else 1)
    return model, cfg


def save_bin(model, path, shards):
    """pytorch_model*.bin as transformers 4.x wrote them (transformers 5 writes only safetensors)."""
    path.mkdir(parents=True)
    model.config.save_pretrained(path)
    state = model.state_dict()
    if shards == 1:
        torch.save(state, path / "pytorch_model.bin")
        return
    keys = list(state)
    weight_map = {}
    for i, chunk in enumerate(np.array_split(np.arange(len(keys)), shards)):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        torch.save({keys[j]: state[keys[j]] for j in chunk}, path / name)
        weight_map.update({keys[j]: name for j in chunk})
    (path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def save_baichuan(path, preset, seed=0):
    """The Baichuan layout as released: W_pack, model_type baichuan, its own config.json."""
    cfg = get_preset(preset)
    sd = random_hf_state_dict(cfg, seed=seed)
    path.mkdir(parents=True)
    arch = "BaiChuanForCausalLM" if cfg.family == "baichuan" and cfg.position == "rope" else "BaichuanForCausalLM"
    config = {"architectures": [arch], "model_type": "baichuan", "hidden_size": cfg.hidden_size,
              "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
              "num_attention_heads": cfg.num_heads, "vocab_size": cfg.vocab_size, "rms_norm_eps": cfg.rms_norm_eps,
              "model_max_length": cfg.max_position_embeddings, "bos_token_id": 1, "eos_token_id": 2,
              "pad_token_id": 0, "position_encoding": cfg.position}
    (path / "config.json").write_text(json.dumps(config))
    save_file(sd, str(path / "model.safetensors"))
    return sd, cfg


def all_tensors(directory):
    reader = open_hf(directory)
    return {k: np.asarray(reader.get(k)) for k in reader.keys()}


def tree_equal(a, b):
    return all(jax.tree.leaves(jax.tree.map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), a, b)))


@pytest.mark.parametrize("preset,family", [("llama2-tiny", None), ("ctllm-tiny", "ctllm"), ("ziya-tiny", "ziya")])
def test_llama_layout_logits_match_transformers_and_round_trip_bit_exactly(tmp_path, preset, family):
    model, cfg = save_llama(tmp_path / "hf", preset)
    args = ["convert", "--from", "hf", "--to", "jaxllm", str(tmp_path / "hf"), str(tmp_path / "jx")]
    assert cli(args + (["--family", family] if family else [])) == 0
    params, jcfg = load_params(tmp_path / "jx")
    assert jcfg.family == (family or "llama") and jcfg.num_kv_heads == cfg.num_kv_heads
    tokens = np.random.default_rng(0).integers(0, cfg.num_pieces, size=(2, 16))
    with torch.no_grad():
        expected = model(torch.from_numpy(tokens)).logits.numpy()
    ours = np.asarray(fwd(jcfg, params, jnp.asarray(tokens)))
    assert np.abs(ours - expected).max() / np.abs(expected).max() < 1e-4
    # HF → jaxllm → HF reproduces every tensor; the export loads in transformers without remote code
    assert cli(["convert", "--from", "jaxllm", "--to", "hf", str(tmp_path / "jx"), str(tmp_path / "hf2")]) == 0
    original, exported = all_tensors(tmp_path / "hf"), all_tensors(tmp_path / "hf2")
    assert set(original) == set(exported)
    assert all(np.array_equal(original[k], exported[k]) for k in original)
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf2")
    assert reloaded.config.vocab_size == cfg.vocab_size
    # jaxllm → HF → jaxllm
    hf_to_jaxllm(tmp_path / "hf2", tmp_path / "jx2", family=family)
    assert tree_equal(params, load_params(tmp_path / "jx2")[0])


@pytest.mark.parametrize("preset", ["baichuan-tiny", "baichuan-13b-tiny", "baichuan2-tiny", "baichuan2-13b-tiny"])
def test_baichuan_layout_matches_numpy_reference_and_round_trips(tmp_path, preset):
    sd, cfg = save_baichuan(tmp_path / "hf", preset)
    family = "baichuan2" if cfg.norm_head else None  # tiny vocabularies cannot reveal Baichuan 2
    jcfg = hf_to_jaxllm(tmp_path / "hf", tmp_path / "jx", family=family)
    assert (jcfg.family, jcfg.position, jcfg.norm_head) == (cfg.family, cfg.position, cfg.norm_head)
    params, jcfg = load_params(tmp_path / "jx")
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, size=20)
    ours = np.asarray(fwd(jcfg, params, jnp.asarray(tokens)[None])[0])
    expected = reference_logits(sd, cfg, tokens)
    assert np.abs(ours - expected).max() / np.abs(expected).max() < 1e-4
    jaxllm_to_hf(tmp_path / "jx", tmp_path / "hf2")
    exported = all_tensors(tmp_path / "hf2")
    assert set(exported) == set(sd) and all(np.array_equal(sd[k], exported[k]) for k in sd)
    assert "self_attn.W_pack.weight" in " ".join(exported)  # written in Baichuan's own layout
    exported_cfg = json.loads((tmp_path / "hf2" / "config.json").read_text())
    assert exported_cfg["model_type"] == "baichuan"
    hf_to_jaxllm(tmp_path / "hf2", tmp_path / "jx2")  # the export is self-describing (no --family)
    assert tree_equal(params, load_params(tmp_path / "jx2")[0])


def test_readers_agree_safetensors_sharded_bin_and_meta(tmp_path):
    model, cfg = save_llama(tmp_path / "safe", "llama2-tiny")
    save_llama(tmp_path / "sharded", "llama2-tiny", shard="60KB")
    save_llama(tmp_path / "bin", "llama2-tiny", safe=False)
    save_llama(tmp_path / "bin_sharded", "llama2-tiny", safe=False, shard="60KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert (tmp_path / "bin_sharded" / "pytorch_model.bin.index.json").is_file()
    # Meta's layout: two model-parallel shards, RoPE rows in adjacent-pair order (spec §2.2-2.3)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    meta = tmp_path / "meta"
    meta.mkdir()
    shards = [{}, {}]
    split = lambda w, dim: np.split(w, 2, axis=dim)
    for k, v in sd.items():
        if k.startswith("model.layers."):
            _, _, i, rest = k.split(".", 3)
            name, dim = {"self_attn.q_proj.weight": ("attention.wq.weight", 0),
                         "self_attn.k_proj.weight": ("attention.wk.weight", 0),
                         "self_attn.v_proj.weight": ("attention.wv.weight", 0),
                         "self_attn.o_proj.weight": ("attention.wo.weight", 1),
                         "mlp.gate_proj.weight": ("feed_forward.w1.weight", 0),
                         "mlp.down_proj.weight": ("feed_forward.w2.weight", 1),
                         "mlp.up_proj.weight": ("feed_forward.w3.weight", 0),
                         "input_layernorm.weight": ("attention_norm.weight", None),
                         "post_attention_layernorm.weight": ("ffn_norm.weight", None)}[rest]
            if "q_proj" in rest:
                v = rope_unpermute(v, cfg.num_heads)
            if "k_proj" in rest:
                v = rope_unpermute(v, cfg.num_kv_heads)
            name = f"layers.{i}.{name}"
        else:
            name, dim = {"model.embed_tokens.weight": ("tok_embeddings.weight", 1), "model.norm.weight": ("norm.weight", None),
                         "lm_head.weight": ("output.weight", 0)}[k]
        parts = [v, v] if dim is None else split(v, dim)
        for shard, part in zip(shards, parts):
            shard[name] = torch.from_numpy(np.ascontiguousarray(part))
    for i, shard in enumerate(shards):
        torch.save(shard, meta / f"consolidated.0{i}.pth")
    (meta / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                                                  "multiple_of": 32, "norm_eps": 1e-5, "vocab_size": -1}))
    # FFN width from multiple_of: 32·ceil(⌊8·64/3⌋/32) = 192 ≠ 160, so the tiny preset's 160 needs ffn_dim_multiplier
    params_json = json.loads((meta / "params.json").read_text())
    params_json["ffn_dim_multiplier"] = 160 / 170 + 1e-9
    params_json["multiple_of"] = 16
    (meta / "params.json").write_text(json.dumps(params_json))
    reference = None
    for name in ("safe", "sharded", "bin", "bin_sharded", "meta"):
        hf_to_jaxllm(tmp_path / name, tmp_path / f"{name}.jx")
        params, _ = load_params(tmp_path / f"{name}.jx")
        if reference is None:
            reference = params
        assert tree_equal(reference, params), name


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {Path('/tmp') / 'jaxllm-pwned'}",))


def test_malicious_pickle_is_refused_without_running_code(tmp_path):
    hf = tmp_path / "evil"
    save_llama(hf, "llama2-tiny", safe=False)
    marker = Path("/tmp/jaxllm-pwned")
    marker.unlink(missing_ok=True)
    torch.save({"model.embed_tokens.weight": Exploit()}, hf / "pytorch_model.bin")
    with pytest.raises(ConversionError, match="pytorch_model.bin: refused to load"):
        hf_to_jaxllm(hf, tmp_path / "out")
    assert not marker.exists() and not (tmp_path / "out").exists()
    with open(hf / "pytorch_model.bin", "wb") as f:  # the legacy (non-zip) pickle format too
        pickle.dump({"model.embed_tokens.weight": Exploit()}, f)
    with pytest.raises(ConversionError, match="pytorch_model.bin: refused to load"):
        hf_to_jaxllm(hf, tmp_path / "out")
    assert not marker.exists()


def corrupt(directory, how):
    path = directory / "model.safetensors"
    tensors = {k: v.copy() for k, v in all_tensors(directory).items()}
    if how == "missing":
        del tensors["model.layers.1.mlp.up_proj.weight"]
    elif how == "unexpected":
        tensors["model.layers.9.mlp.up_proj.weight"] = tensors["model.norm.weight"]
    elif how == "shape":
        tensors["model.layers.0.self_attn.k_proj.weight"] = tensors["model.layers.0.self_attn.q_proj.weight"]
    if how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) - 1000])
    elif how == "model_type":
        cfg = json.loads((directory / "config.json").read_text())
        cfg["model_type"], cfg["architectures"] = "gpt2", ["GPT2LMHeadModel"]
        (directory / "config.json").write_text(json.dumps(cfg))
    else:
        save_file(tensors, str(path))


@pytest.mark.parametrize("how,message", [
    ("missing", "missing tensor model.layers.1.mlp.up_proj.weight"),
    ("unexpected", "unexpected tensor model.layers.9.mlp.up_proj.weight"),
    ("shape", r"tensor model.layers.0.self_attn.k_proj.weight has shape \(64, 64\), expected \(32, 64\)"),
    ("truncated", "model.safetensors: truncated safetensors file"),
    ("model_type", "unknown model_type 'gpt2'"),
])
def test_bad_input_names_the_tensor_or_file_and_leaves_no_destination(tmp_path, capsys, how, message):
    save_llama(tmp_path / "hf", "llama2-tiny")
    corrupt(tmp_path / "hf", how)
    capsys.readouterr()  # drop transformers' progress bars
    assert cli(["convert", "--from", "hf", "--to", "jaxllm", str(tmp_path / "hf"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    import re
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no partial staging left behind


def test_existing_destination_is_never_overwritten(tmp_path, capsys):
    save_llama(tmp_path / "hf", "llama2-tiny")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("keep me")
    capsys.readouterr()
    assert cli(["convert", "--from", "hf", "--to", "jaxllm", str(tmp_path / "hf"), str(tmp_path / "out")]) == 2
    assert "destination exists" in capsys.readouterr().err
    assert (tmp_path / "out" / "precious.txt").read_text() == "keep me"


def test_greedy_20_tokens_match_transformers_generate(tmp_path):
    model, cfg = save_llama(tmp_path / "hf", "llama2-tiny", seed=5)
    hf_to_jaxllm(tmp_path / "hf", tmp_path / "jx")
    params, jcfg = load_params(tmp_path / "jx")
    prompt = [1, 17, 42, 99, 7]
    with torch.no_grad():
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, min_new_tokens=20,
                                  eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    ours = generate(jcfg, params, [prompt], SamplingParams(temperature=0.0, max_new_tokens=20)).tokens[0]
    assert ours == expected


def test_apply_delta_merges_in_float16(tmp_path):
    cfg = get_preset("ziya-tiny")
    base = random_hf_state_dict(cfg, seed=1)
    delta = random_hf_state_dict(cfg, seed=2)
    for name, sd in (("base", base), ("delta", delta)):
        (tmp_path / name).mkdir()
        save_file({k: v.astype(np.float16) for k, v in sd.items()}, str(tmp_path / name / "model.safetensors"))
    (tmp_path / "delta" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert cli(["convert", "apply-delta", "--base", str(tmp_path / "base"), "--delta", str(tmp_path / "delta"),
                str(tmp_path / "merged")]) == 0
    merged = all_tensors(tmp_path / "merged")
    for k in base:
        d = delta[k].astype(np.float16)
        expected = d if k in ("model.embed_tokens.weight", "lm_head.weight") else base[k].astype(np.float16) + d
        assert np.array_equal(merged[k], expected), k
    assert (tmp_path / "merged" / "config.json").is_file()


def test_dtype_option_and_bfloat16_storage(tmp_path):
    save_llama(tmp_path / "hf", "llama2-tiny")
    hf_to_jaxllm(tmp_path / "hf", tmp_path / "jx", dtype="bfloat16")
    params, cfg = load_params(tmp_path / "jx")
    assert cfg.param_dtype == "bfloat16" and params["embedding"].dtype == jnp.bfloat16
    jaxllm_to_hf(tmp_path / "jx", tmp_path / "hf2")
    exported = SafetensorsFile(next((tmp_path / "hf2").glob("*.safetensors")))
    assert exported.get("model.embed_tokens.weight").dtype == ml_dtypes.bfloat16
