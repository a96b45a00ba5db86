"""Fidelity figures on tiny upstream-layout checkpoints (issue #14), for whichever `jaxllm` is first on the
path, so the same script measures before and after a change:

    PYTHONPATH=. python tests/fidelity_figures.py                     # this checkout
    git archive 7ccc5a3 | tar -x -C /tmp/base                         # an older one
    PYTHONPATH=/tmp/base python tests/fidelity_figures.py

The checkpoints are built by the tests' helpers (reference.py, baichuan_remote.py) beside this file."""
import json, os, shutil, sys, tempfile
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.append(str(Path(__file__).resolve().parent))
import numpy as np, ml_dtypes, jax, jax.numpy as jnp, torch, transformers  # noqa: E401
import jaxllm
from jaxllm.models import forward, get_preset
from jaxllm.checkpoint import load_params
from jaxllm.convert.core import hf_to_jaxllm, jaxllm_to_hf
from reference import random_hf_state_dict, reference_logits, write_meta
from baichuan_remote import write_release

print("code:", Path(jaxllm.__file__).parent.parent)
tmp = Path(tempfile.mkdtemp(prefix="jaxllm-fidelity-"))
DATA = Path(__file__).resolve().parent / "data"
rel = lambda a, b: float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())

def logits(jx, tokens):
    params, cfg = load_params(jx)
    return np.asarray(forward(cfg.replace(dtype="float32"), params, jnp.asarray(tokens)[None])[0])

# 1. NormHead: bf16 release, float32 compute, vs float64 reference
for variant, preset in (("baichuan2-7b", "baichuan2-tiny"), ("baichuan2-13b", "baichuan2-13b-tiny")):
    cfg = get_preset(preset)
    sd = {k: v.astype(ml_dtypes.bfloat16) for k, v in random_hf_state_dict(cfg, seed=0).items()}
    write_release(tmp / variant, cfg, sd, variant)
    config = json.loads((tmp / variant / "config.json").read_text())  # ALiBi said outright: NormHead alone
    shutil.copytree(tmp / variant, tmp / f"{variant}-said")
    (tmp / f"{variant}-said" / "config.json").write_text(json.dumps({**config, "position_encoding": cfg.position}))
    hf_to_jaxllm(tmp / f"{variant}-said", tmp / f"{variant}.jx", family="baichuan2")
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, 20)
    print(f"[1] {variant} NormHead bf16 storage fp32 compute, rel logit err vs reference: "
          f"{rel(logits(tmp / f'{variant}.jx', tokens), reference_logits(sd, cfg, tokens)):.1e}")

# 2. ALiBi at a non-13B size (80 wide x 2 layers), family not forced
cfg = get_preset("baichuan2-13b-tiny")
sd = {k: v.astype(ml_dtypes.bfloat16) for k, v in random_hf_state_dict(cfg, seed=0).items()}
hf_to_jaxllm(tmp / "baichuan2-13b", tmp / "b13.jx")
jcfg = load_params(tmp / "b13.jx")[1]
tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, 20)
print(f"[2] Baichuan2-13B code at 80x2, no --family: read as family={jcfg.family} position={jcfg.position} "
      f"norm_head={jcfg.norm_head}; rel logit err vs reference {rel(logits(tmp / 'b13.jx', tokens), reference_logits(sd, cfg, tokens)):.1e}")

# 3. Baichuan export loaded with trust_remote_code=True
transformers.dynamic_module_utils.HF_MODULES_CACHE = str(tmp / "modules")
for variant, preset in (("baichuan-7b", "baichuan-tiny"), ("baichuan2-13b", None)):
    if preset:
        cfg = get_preset(preset)
        sd = {k: v.astype(ml_dtypes.bfloat16) for k, v in random_hf_state_dict(cfg, seed=0).items()}
        write_release(tmp / variant, cfg, sd, variant)
        hf_to_jaxllm(tmp / variant, tmp / f"{variant}.jx")
    src = tmp / f"{variant}.jx" if preset else tmp / "b13.jx"
    out = tmp / f"export-{variant}"
    jaxllm_to_hf(src, out)
    tokens = np.random.default_rng(3).integers(0, 256, 20)
    try:
        m = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
        with torch.no_grad():
            got = m(torch.tensor(tokens)[None]).logits[0].numpy()
        print(f"[3] {variant} export + trust_remote_code=True: loads {type(m).__name__}; rel logit err vs jaxllm "
              f"{rel(logits(src, tokens), got):.1e}")
        if variant == "baichuan-7b":  # the same export without Baichuan-7B's persistent inv_freq buffers
            stripped = tmp / "export-noinv"
            shutil.copytree(out, stripped)
            from safetensors.numpy import load_file, save_file
            for f in stripped.glob("*.safetensors"):
                save_file({k: v for k, v in load_file(f).items() if "inv_freq" not in k}, str(f))
            idx = json.loads((stripped / "model.safetensors.index.json").read_text())
            idx["weight_map"] = {k: v for k, v in idx["weight_map"].items() if "inv_freq" not in k}
            (stripped / "model.safetensors.index.json").write_text(json.dumps(idx))
            m = transformers.AutoModelForCausalLM.from_pretrained(stripped, trust_remote_code=True, dtype=torch.float32)
            with torch.no_grad():
                got = m(torch.tensor(tokens)[None]).logits[0].numpy()
            print(f"[3] baichuan-7b export without rotary_emb.inv_freq: rel logit err {rel(logits(src, tokens), got):.1e}")
    except Exception as err:
        print(f"[3] {variant} export + trust_remote_code=True: FAILS: {type(err).__name__}: {str(err).splitlines()[0][:160]}")

# 4. Ziya prompts id-for-id vs transformers' slow sentencepiece tokenizer; can <bot> be sampled?
from jaxllm.tokenizer import Tokenizer, extend_tokenizer
from jaxllm.inference.sampling import sample
from jaxllm.inference import SamplingParams
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend
z = tmp / "ziya"
llama = Tokenizer(DATA / "llama2-32k.model")
chars = [chr(c) for c in range(0x4E00, 0x9FA6) if not llama.has_piece(chr(c))][:7408]
z.mkdir(); extend_tokenizer(DATA / "llama2-32k.model", z / "tokenizer.model", chars)
(z / "added_tokens.json").write_text(json.dumps({"<human>": 39408, "<bot>": 39409}))
(z / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "tokenizer_class": "LlamaTokenizer"}))
ours, ref = Tokenizer.load(z), SentencePieceBackend.from_pretrained(z)
queries = ["写一首关于月亮的诗", "How are you? 你好！", "  spaces  around  ", "1+1=?\n换行", "表情😀和龘"]
same = sum(ours.encode(f"<human>:{q.strip()}\n<bot>:") == ref.encode(f"<human>:{q.strip()}\n<bot>:") for q in queries)
print(f"[4] Ziya prompts encoded id-for-id as transformers: {same}/{len(queries)}; '<human>' -> {ours.encode('<human>')}; "
      f"vocab limit {ours.vocab_size}")
lg = jnp.full((1, 39424), -5.0).at[0, 39409].set(5.0)
print(f"[4] greedy pick when <bot> (39409) has the top logit: {int(sample(lg, jax.random.key(0), SamplingParams(temperature=0.0), vocab_limit=ours.vocab_size)[0])}")

# 5. Baichuan-13B's tokenizer_config.json says add_bos_token false: jaxllm generate's prompt ids
b = tmp / "bc13"; b.mkdir(); shutil.copy(DATA / "baichuan-64k.model", b / "tokenizer.model")
(b / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
try:
    tok = Tokenizer.load(b, family="baichuan"); bos = tok.add_bos
except TypeError:
    tok = Tokenizer.load(b); bos = "baichuan" not in ("baichuan2",)  # the old generate_cli rule
print(f"[5] Baichuan-13B files, generate prompt 'hello' -> {tok.encode('hello', bos=bos)}")

# 6. Meta release: tokenizer.model beside llama-2-7b/
root = tmp / "llama"
mcfg = get_preset("llama2-tiny", vocab_size=32000, num_kv_heads=4, intermediate_size=192)
write_meta(root / "llama-2-7b", random_hf_state_dict(mcfg, seed=5),
           {"dim": 64, "n_layers": 2, "n_heads": 4, "multiple_of": 64, "norm_eps": 1e-5}, shards=1)
shutil.copy(DATA / "llama2-32k.model", root / "tokenizer.model")
hf_to_jaxllm(root / "llama-2-7b", tmp / "meta.jx")
from jaxllm.inference.loading import load_model
print(f"[6] Meta release converted: tokenizer stored with it: {(tmp / 'meta.jx' / 'tokenizer.model').is_file()}; "
      f"load_model finds one: {load_model(tmp / 'meta.jx')[2] is not None}")
shutil.rmtree(tmp, ignore_errors=True)
