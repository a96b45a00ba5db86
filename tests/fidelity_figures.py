"""Fidelity figures on tiny upstream-layout checkpoints (issue #14), for whichever `jaxllm` is first on the
path, so the same script measures before and after a change:

    PYTHONPATH=. python tests/fidelity_figures.py                     # this checkout
    git archive 7ccc5a3 | tar -x -C /tmp/base                         # an older one
    PYTHONPATH=/tmp/base python tests/fidelity_figures.py

The checkpoints are built by the tests' helpers (reference.py, baichuan_remote.py) beside this file."""
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.append(str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend  # noqa: E402

import jaxllm  # noqa: E402
from baichuan_remote import write_release  # noqa: E402
from jaxllm.checkpoint import load_params  # noqa: E402
from jaxllm.convert.core import hf_to_jaxllm, jaxllm_to_hf  # noqa: E402
from jaxllm.inference import SamplingParams  # noqa: E402
from jaxllm.inference.loading import load_model  # noqa: E402
from jaxllm.inference.sampling import sample  # noqa: E402
from jaxllm.models import forward, get_preset  # noqa: E402
from jaxllm.tokenizer import Tokenizer, extend_tokenizer  # noqa: E402
from reference import random_hf_state_dict, reference_logits, write_meta  # noqa: E402

DATA = Path(__file__).resolve().parent / "data"


def rel(ours, expected) -> float:
    expected = np.asarray(expected, np.float64)
    return float(np.abs(np.asarray(ours, np.float64) - expected).max() / np.abs(expected).max())


def logits(jx, tokens):
    params, cfg = load_params(jx)
    return np.asarray(forward(cfg.replace(dtype="float32"), params, jnp.asarray(tokens)[None])[0])


def release(tmp, variant, preset, **config_changes):
    """A bf16 Baichuan release of `variant` (its remote code, auto_map, no position field)."""
    cfg = get_preset(preset)
    sd = {k: v.astype(ml_dtypes.bfloat16) for k, v in random_hf_state_dict(cfg, seed=0).items()}
    write_release(tmp / variant, cfg, sd, variant)
    if config_changes:
        config = json.loads((tmp / variant / "config.json").read_text())
        (tmp / variant / "config.json").write_text(json.dumps({**config, **config_changes}))
    return cfg, sd


def remote_logits(directory, tokens):
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, dtype=torch.float32)
    with torch.no_grad():
        return type(model).__name__, model(torch.tensor(tokens)[None]).logits[0].numpy()


def without_inv_freq(src, dst):
    shutil.copytree(src, dst)
    for shard in dst.glob("*.safetensors"):
        save_file({k: v for k, v in load_file(shard).items() if "inv_freq" not in k}, str(shard))
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if "inv_freq" not in k}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))


def main(tmp: Path) -> None:
    print("code:", Path(jaxllm.__file__).parent.parent)
    tokens = np.random.default_rng(1).integers(0, 256, 20)

    # 1. NormHead alone (the position said outright with jaxllm's own config key, which every version reads)
    for variant, preset in (("baichuan2-7b", "baichuan2-tiny"), ("baichuan2-13b", "baichuan2-13b-tiny")):
        cfg, sd = release(tmp / "said", variant, preset, position_encoding=get_preset(preset).position)
        hf_to_jaxllm(tmp / "said" / variant, tmp / f"{variant}.jx", family="baichuan2")
        print(f"[1] {variant} NormHead, bf16 storage, fp32 compute: relative logit error vs the float64 reference "
              f"{rel(logits(tmp / f'{variant}.jx', tokens), reference_logits(sd, cfg, tokens)):.1e}")

    # 2. Baichuan 2's 13B code at 80 wide x 2 layers, no --family
    cfg, sd = release(tmp, "baichuan2-13b", "baichuan2-13b-tiny")
    hf_to_jaxllm(tmp / "baichuan2-13b", tmp / "b13.jx")
    got = load_params(tmp / "b13.jx")[1]
    print(f"[2] Baichuan2-13B code at 80x2: read as family={got.family} position={got.position} "
          f"norm_head={got.norm_head}; relative logit error vs the reference "
          f"{rel(logits(tmp / 'b13.jx', tokens), reference_logits(sd, cfg, tokens)):.1e}")

    # 3. exports loaded the way Baichuan users load them
    transformers.dynamic_module_utils.HF_MODULES_CACHE = str(tmp / "modules")
    release(tmp, "baichuan-7b", "baichuan-tiny")
    hf_to_jaxllm(tmp / "baichuan-7b", tmp / "b7.jx")
    for variant, jx in (("baichuan-7b", tmp / "b7.jx"), ("baichuan2-13b", tmp / "b13.jx")):
        jaxllm_to_hf(jx, tmp / f"export-{variant}")
        try:
            name, got = remote_logits(tmp / f"export-{variant}", tokens)
            print(f"[3] {variant} export, trust_remote_code=True: loads {name}; relative logit error vs jaxllm "
                  f"{rel(logits(jx, tokens), got):.1e}")
        except Exception as err:  # noqa: BLE001 - the figure is the failure itself
            print(f"[3] {variant} export, trust_remote_code=True: fails: {type(err).__name__}: "
                  f"{str(err).splitlines()[0][:120]}")
            continue
        if variant == "baichuan-7b":
            without_inv_freq(tmp / "export-baichuan-7b", tmp / "export-noinv")
            _, got = remote_logits(tmp / "export-noinv", tokens)
            print(f"[3] baichuan-7b export without rotary_emb.inv_freq: relative logit error "
                  f"{rel(logits(jx, tokens), got):.1e}")

    # 4. Ziya's <human> / <bot>: id-for-id vs transformers' slow sentencepiece tokenizer; can <bot> be sampled?
    llama = Tokenizer(DATA / "llama2-32k.model")
    chars = [chr(c) for c in range(0x4E00, 0x9FA6) if not llama.has_piece(chr(c))][:7408]
    ziya = tmp / "ziya"
    ziya.mkdir()
    extend_tokenizer(DATA / "llama2-32k.model", ziya / "tokenizer.model", chars)
    (ziya / "added_tokens.json").write_text(json.dumps({"<human>": 39408, "<bot>": 39409}))
    (ziya / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True}))
    ours, ref = Tokenizer.load(ziya), SentencePieceBackend.from_pretrained(ziya)
    queries = ("写一首关于月亮的诗", "How are you? 你好！", "spaces  around", "1+1=?\n换行", "表情😀和龘")
    prompts = [f"<human>:{q}\n<bot>:" for q in queries]
    same = sum(ours.encode(p) == ref.encode(p) for p in prompts)
    print(f"[4] Ziya prompts encoded id-for-id as transformers: {same}/{len(prompts)}; '<human>' -> "
          f"{ours.encode('<human>')}; sampling vocabulary limit {ours.vocab_size}")
    top = jnp.full((1, 39424), -5.0).at[0, 39409].set(5.0)
    pick = sample(top, jax.random.key(0), SamplingParams(temperature=0.0), vocab_limit=ours.vocab_size)
    print(f"[4] greedy pick when <bot> (39409) has the top logit: {int(pick[0])}")

    # 5. Baichuan-13B's tokenizer_config.json says add_bos_token false: the ids `jaxllm generate` feeds
    bc13 = tmp / "bc13"
    bc13.mkdir()
    shutil.copy(DATA / "baichuan-64k.model", bc13 / "tokenizer.model")
    (bc13 / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    try:
        tok = Tokenizer.load(bc13, family="baichuan")
        bos = tok.add_bos
    except TypeError:  # before: no family argument, and generate_cli's rule was "BOS unless baichuan2"
        tok, bos = Tokenizer.load(bc13), True
    print(f"[5] Baichuan-13B files, `jaxllm generate --prompt hello` ids: {tok.encode('hello', bos=bos)}")

    # 6. Meta's release: llama/tokenizer.model beside llama/llama-2-7b/
    cfg = get_preset("llama2-tiny", vocab_size=32000, num_kv_heads=4, intermediate_size=192)
    write_meta(tmp / "llama" / "llama-2-7b", random_hf_state_dict(cfg, seed=5),
               {"dim": 64, "n_layers": 2, "n_heads": 4, "multiple_of": 64, "norm_eps": 1e-5}, shards=1)
    shutil.copy(DATA / "llama2-32k.model", tmp / "llama" / "tokenizer.model")
    hf_to_jaxllm(tmp / "llama" / "llama-2-7b", tmp / "meta.jx")
    print(f"[6] Meta release converted: tokenizer kept: {(tmp / 'meta.jx' / 'tokenizer.model').is_file()}; "
          f"generate finds one without --tokenizer: {load_model(tmp / 'meta.jx')[2] is not None}")


if __name__ == "__main__":
    scratch = Path(tempfile.mkdtemp(prefix="jaxllm-fidelity-"))
    try:
        main(scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
