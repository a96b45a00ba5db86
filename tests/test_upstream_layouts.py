"""Fidelity on each family's real on-disk layout, built tiny and random here: bf16 shards evaluated in
float32, Baichuan's family and position encoding read from the modeling code it ships, exports loaded back
the way Baichuan users load them (`trust_remote_code=True`) or as a stock Llama (`--hf-arch llama`), and
Meta's tokenizer.model found beside the model folder."""
import json
import re
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

from baichuan_remote import VARIANTS, released_config, write_release, write_remote_code
from jaxllm.checkpoint import load_params, read_model_config, save_params
from jaxllm.cli import main as cli
from jaxllm.convert.core import hf_to_jaxllm, jaxllm_to_hf
from jaxllm.convert.hf_config import model_config_from_hf
from jaxllm.inference.loading import load_model
from jaxllm.convert.mapping import hf_to_params
from jaxllm.models import forward, get_preset
from jaxllm.train import rundir
from reference import random_hf_state_dict, reference_logits, write_meta
from hf_modules import private_module_cache

DATA = Path(__file__).parent / "data"
fwd = jax.jit(forward, static_argnums=0)
BAICHUAN = {"baichuan-7b": "baichuan-tiny", "baichuan-13b": "baichuan-13b-tiny", "baichuan2-7b": "baichuan2-tiny",
            "baichuan2-13b": "baichuan2-13b-tiny"}


def rel_err(ours, expected):
    expected = np.asarray(expected, np.float64)
    return float(np.abs(np.asarray(ours, np.float64) - expected).max() / np.abs(expected).max())


def stored(sd, dtype):
    return {k: v.astype(dtype) for k, v in sd.items()}


def ours_fp32(jx, tokens, params=None):
    """Logits of a converted checkpoint, parameters as stored (or `params`), float32 compute."""
    stored_params, cfg = load_params(jx)
    cfg = cfg.replace(dtype="float32", name="tiny")  # one compiled program per architecture and dtype
    return np.asarray(fwd(cfg, stored_params if params is None else params, jnp.asarray(tokens)[None])[0])


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    """Every Baichuan variant as baichuan-inc releases it (its own remote code named by `auto_map`, no
    position field, bf16 safetensors shards), at tiny sizes that are not 13B's, converted once with no
    --family: {variant: (cfg, bf16 state dict, release dir, jaxllm dir, the lines conversion printed)}."""
    root = tmp_path_factory.mktemp("releases")
    out = {}
    for n, (variant, preset) in enumerate(BAICHUAN.items()):
        cfg = get_preset(preset)
        sd = stored(random_hf_state_dict(cfg, seed=n), ml_dtypes.bfloat16)
        write_release(root / variant, cfg, sd, variant)
        lines = []
        hf_to_jaxllm(root / variant, root / f"{variant}.jx", log=lines.append)
        out[variant] = cfg, sd, root / variant, root / f"{variant}.jx", lines
    return out


@pytest.fixture(scope="module")
def load_remote(tmp_path_factory):
    """`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` in float32, its module cache in
    a temporary directory (each directory needs a unique name: transformers keys modules by it)."""
    cache = tmp_path_factory.mktemp("hf_modules")
    with pytest.MonkeyPatch.context() as patch:
        private_module_cache(patch, cache)
        yield lambda path: transformers.AutoModelForCausalLM.from_pretrained(
            path, trust_remote_code=True, dtype=torch.float32).eval()


def torch_logits(model, tokens):
    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(tokens))[None]).logits[0].float().numpy()


@pytest.mark.parametrize("variant", list(BAICHUAN))
def test_baichuan_bf16_release_in_float32_matches_the_reference(releases, variant, capsys):
    cfg, sd, _, jx, _ = releases[variant]
    jcfg = read_model_config(jx)
    assert (jcfg.family, jcfg.position, jcfg.norm_head, jcfg.param_dtype) == \
        (cfg.family, cfg.position, cfg.norm_head, "bfloat16")  # detected from the code; stored as released
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, 20)
    err = rel_err(ours_fp32(jx, tokens), reference_logits(sd, cfg, tokens))
    with capsys.disabled():
        print(f"\n  {variant}: bf16 storage, fp32 compute vs float64 reference: {err:.1e}")
    assert err < 1e-4


@pytest.mark.parametrize("family,dtype", [pytest.param("llama", np.float16, marks=pytest.mark.slow),
                                          ("ctllm", ml_dtypes.bfloat16), ("ziya", np.float16)])
def test_llama_layout_release_in_float32_matches_the_reference(tmp_path, family, dtype):
    """Llama 2 and Ziya ship float16, CT-LLM-SFT bfloat16 (spec §1): evaluated in float32 from storage."""
    cfg = get_preset(f"{family if family != 'llama' else 'llama2'}-tiny")
    sd = stored(random_hf_state_dict(cfg, seed=7), dtype)
    (tmp_path / "hf").mkdir()
    save_file(sd, str(tmp_path / "hf" / "model.safetensors"))
    hf = transformers.LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                                  num_hidden_layers=cfg.num_layers, intermediate_size=cfg.intermediate_size,
                                  num_attention_heads=cfg.num_heads,
                                  num_key_value_heads=cfg.num_kv_heads, rms_norm_eps=cfg.rms_norm_eps,
                                  tie_word_embeddings=False, dtype="float16" if dtype == np.float16 else "bfloat16")
    hf.save_pretrained(tmp_path / "hf")
    hf_to_jaxllm(tmp_path / "hf", tmp_path / "jx", family=family)
    assert read_model_config(tmp_path / "jx").param_dtype == np.dtype(dtype).name
    tokens = np.random.default_rng(2).integers(0, cfg.num_pieces, 20)
    assert rel_err(ours_fp32(tmp_path / "jx", tokens), reference_logits(sd, cfg, tokens)) < 1e-4


def test_family_and_alibi_are_read_from_the_shipped_modeling_code(releases, tmp_path):
    # an 80-wide, 2-layer Baichuan 2 shipping the 13B code: ALiBi and NormHead, whatever the size
    *_, lines = releases["baichuan2-13b"]
    assert "family: baichuan2 (modeling_baichuan.py has NormHead)" in lines
    assert "position encoding: ALiBi (modeling_baichuan.py (the shipped modeling code) builds ALiBi masks)" in lines
    assert "position encoding: RoPE (modeling_baichuan.py (the shipped modeling code) applies rotary " \
           "embeddings)" in releases["baichuan-7b"][-1]

    def detect(variant=None, **changes):
        shutil.rmtree(tmp_path / "c", ignore_errors=True)
        auto_map = write_remote_code(tmp_path / "c", variant or "baichuan2-13b")
        if not variant:  # auto_map names code that is not there
            (tmp_path / "c" / "modeling_baichuan.py").unlink()
        config = {**released_config(get_preset("baichuan-13b"), auto_map), **changes}
        (tmp_path / "c" / "config.json").write_text(json.dumps(config))
        notes = []
        return model_config_from_hf(tmp_path / "c", notes=notes), notes

    # 5120 x 40 (13B's size) with 7B code is RoPE; without code the size decides, and the note says so
    cfg, notes = detect("baichuan-7b")
    assert (cfg.family, cfg.position) == ("baichuan", "rope")
    cfg, notes = detect()
    assert cfg.position == "alibi" and notes == ["position encoding: ALiBi (no modeling file shipped; 5120 wide x "
                                                 "40 layers is the 13B size, which uses ALiBi)"]
    # the code is read as text, never imported or run
    marker = tmp_path / "ran"
    (tmp_path / "c" / "modeling_baichuan.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\ndef _gen_alibi_mask(): ...\nclass NormHead: ...\n")
    cfg = model_config_from_hf(tmp_path / "c")
    assert (cfg.family, cfg.position) == ("baichuan2", "alibi") and not marker.exists()


@pytest.mark.parametrize("variant", list(BAICHUAN))
def test_export_of_a_run_loads_with_trust_remote_code_and_identical_logits(releases, load_remote, variant, tmp_path):
    """import → training run directory → export: the shipped code and auto_map travel with the model, and
    the export loads as Baichuan users load it."""
    cfg, sd, release, jx, _ = releases[variant]
    code = sorted(p.name for p in (jx / "remote_code").iterdir())
    assert code == ["auto_map.json", "configuration_baichuan.py", "modeling_baichuan.py"]
    run = tmp_path / f"run-{variant}"  # what `train()` leaves: RUN/checkpoints + the starting model's files
    params, jcfg = load_params(jx)
    params = jax.tree.map(lambda x: np.asarray(x) * np.asarray(1.5, x.dtype), params)  # "trained"
    run.mkdir()
    rundir.copy_model_files(run, None, jx)
    save_params(run / "checkpoints", params, jcfg, step=3)
    export = tmp_path / f"export-{variant}"
    jaxllm_to_hf(run, export)
    for name in ("configuration_baichuan.py", "modeling_baichuan.py"):
        assert (export / name).read_bytes() == (release / name).read_bytes()
    written = json.loads((export / "config.json").read_text())
    assert written["auto_map"] == json.loads((release / "config.json").read_text())["auto_map"]
    inv_freq = [k for k in json.loads((export / "model.safetensors.index.json").read_text())["weight_map"]
                if k.endswith("rotary_emb.inv_freq")]
    assert len(inv_freq) == (jcfg.num_layers if VARIANTS[variant][3] else 0)  # Baichuan-7B's persistent buffer
    model = load_remote(export)
    assert type(model).__name__ == json.loads((release / "config.json").read_text())["architectures"][0]
    tokens = np.random.default_rng(3).integers(0, cfg.vocab_size, 20)
    assert rel_err(ours_fp32(jx, tokens, params), torch_logits(model, tokens)) < 1e-5


def test_inv_freq_is_exported_where_the_loading_code_keeps_it_as_a_persistent_buffer(tmp_path):
    from jaxllm.checkpoint.companions import persistent_inv_freq

    cfg = get_preset("baichuan-tiny")
    for line, expected in (('self.register_buffer("inv_freq", 1.0 / (b ** (torch.arange(0, d, 2) / d)))', True),
                           ("self.register_buffer('inv_freq', f(torch.arange(0, d, 2)), persistent = False)", False),
                           ("self.inv_freq = 1.0 / (b ** (torch.arange(0, d, 2) / d))", False)):
        (tmp_path / "modeling_baichuan.py").write_text(
            f"class RotaryEmbedding:\n    def __init__(self):\n        {line}\n")
        assert persistent_inv_freq(cfg, tmp_path, None) is expected, line
    assert persistent_inv_freq(cfg, None, None)  # no code carried: Baichuan-7B's own keeps it
    assert not persistent_inv_freq(get_preset("baichuan2-tiny"), None, None)
    assert not persistent_inv_freq(get_preset("baichuan-13b-tiny"), None, None)  # ALiBi


def test_export_without_carried_code_names_baichuan_incs_code(tmp_path, capsys):
    """A Baichuan 2 model trained from a preset carries no code: the export's auto_map names baichuan-inc's
    code on the Hub, and its tokenizer gets a tokenizer_config.json saying the BOS rule jaxllm used."""
    cfg = get_preset("baichuan2-tiny", vocab_size=4096)
    save_params(tmp_path / "jx", hf_to_params(random_hf_state_dict(cfg).__getitem__, cfg), cfg)
    shutil.copy(DATA / "llama2-32k.model", tmp_path / "jx" / "tokenizer.model")  # 32,000 ids, 4,096 rows: refused
    capsys.readouterr()
    assert cli(["convert", "--from", "jaxllm", "--to", "hf", str(tmp_path / "jx"), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(r"tokenizer.model: the tokenizer has ids up to 31999, "
                                                            r"but the model in .* has 4096 embedding rows", err)
    shutil.copy(Path(__file__).parent.parent / "jaxllm" / "assets" / "demo" / "tokenizer.model", tmp_path / "jx")
    assert cli(["convert", "--from", "jaxllm", "--to", "hf", str(tmp_path / "jx"), str(tmp_path / "hf")]) == 0
    out = capsys.readouterr().out
    assert "auto_map names baichuan-inc/Baichuan2-7B-Base's code on the Hub" in out
    assert "(BOS: no, from the baichuan2 default)" in out
    repo = "baichuan-inc/Baichuan2-7B-Base--"
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["auto_map"] == {
        "AutoConfig": f"{repo}configuration_baichuan.BaichuanConfig",
        "AutoModelForCausalLM": f"{repo}modeling_baichuan.BaichuanForCausalLM"}
    written = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert (written["add_bos_token"], written["tokenizer_class"], written["auto_map"]) == \
        (False, "BaichuanTokenizer", {"AutoTokenizer": [f"{repo}tokenization_baichuan.BaichuanTokenizer", None]})


@pytest.mark.parametrize("variant", ["baichuan-7b", "baichuan2-7b"])
def test_hf_arch_llama_loads_in_stock_llama_with_the_same_logits(releases, variant, tmp_path, capsys):
    """W_pack split into q/k/v and NormHead rows normalised: a stock LlamaForCausalLM, no remote code.
    Baichuan-7B: its tensors, bit for bit. Baichuan2-7B: exact to float32 rounding with --dtype float32;
    stored in bfloat16 the normalised rows are rounded once (as Baichuan 2's own bf16 inference rounds them)."""
    from jaxllm.convert.mapping import unit_rows

    cfg, sd, _, jx, _ = releases[variant]
    tokens = np.random.default_rng(4).integers(0, cfg.vocab_size, 20)
    ours = ours_fp32(jx, tokens)
    errors = {}
    for dtype in (("float32", "bfloat16") if cfg.norm_head else ("bfloat16",)):
        out = tmp_path / f"llama-{dtype}"
        assert cli(["convert", "--from", "jaxllm", "--to", "hf", str(jx), str(out), "--hf-arch", "llama",
                    "--dtype", dtype]) == 0
        written = json.loads((out / "config.json").read_text())
        assert (written["model_type"], "auto_map" in written) == ("llama", False)
        model = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        assert not [k for k in model.state_dict() if "W_pack" in k]
        errors[dtype] = rel_err(ours, torch_logits(model, tokens))
    with capsys.disabled():
        print(f"\n  {variant} --hf-arch llama vs jaxllm, relative logit error: " +
              ", ".join(f"{d} export {e:.1e}" for d, e in errors.items()))
    assert errors.get("float32", 0) < 1e-5 and errors["bfloat16"] < (1e-2 if cfg.norm_head else 1e-5)
    # read back as the Baichuan model it is: same tensors, the head's rows normalised (NormHead is idempotent)
    again = hf_to_jaxllm(out, tmp_path / "again")
    assert (again.family, again.position, again.norm_head) == (cfg.family, "rope", cfg.norm_head)
    params, _ = load_params(tmp_path / "again")
    original, _ = load_params(jx)
    head = unit_rows(np.asarray(original["lm_head"]).T).T if cfg.norm_head else original["lm_head"]
    np.testing.assert_allclose(np.asarray(params["lm_head"], np.float32), np.asarray(head, np.float32),
                               rtol=0, atol=1e-2 if cfg.norm_head else 0)  # bf16 rounding of unit rows
    for path in (("embedding",), ("layers", "attn", "wk"), ("layers", "mlp", "down")):
        a, b = params, original
        for key in path:
            a, b = a[key], b[key]
        assert np.array_equal(np.asarray(a), np.asarray(b)), path


def test_hf_arch_llama_and_convert_options_refuse_what_they_cannot_do(releases, tmp_path, capsys):
    jx = releases["baichuan2-13b"][3]
    cases = [
        (["--from", "jaxllm", "--to", "hf", str(jx), str(tmp_path / "a"), "--hf-arch", "llama"],
         r"--hf-arch llama needs a RoPE model; baichuan2 with ALiBi"),
        (["--from", "hf", "--to", "jaxllm", str(releases["baichuan-7b"][2]), str(tmp_path / "b"), "--hf-arch", "llama"],
         r"--hf-arch applies to --to hf"),
        (["--from", "jaxllm", "--to", "hf", str(jx), str(tmp_path / "c"), "--tokenizer", "x.model"],
         r"--tokenizer applies to --from hf"),
        (["--from", "hf", "--to", "jaxllm", str(releases["baichuan-7b"][2]), str(tmp_path / "d"), "--tokenizer",
          str(tmp_path / "none.model")], r"--tokenizer .*none.model: no such tokenizer file"),
    ]
    for args, message in cases:
        capsys.readouterr()
        try:
            code = cli(["convert", *args])
        except SystemExit as exit:  # argparse's usage errors
            code = exit.code
        err = capsys.readouterr().err
        assert code == 2 and re.search(message, err) and len([l for l in err.splitlines() if "error" in l]) == 1, err
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.fixture(scope="module")
def meta_layout(tmp_path_factory):
    """Meta's release as downloaded: llama/tokenizer.model beside llama/llama-2-7b/{consolidated.00.pth,
    params.json}; a vocabulary row for each of the Llama 2 tokenizer's 32,000 pieces."""
    root = tmp_path_factory.mktemp("meta") / "llama"
    cfg = get_preset("llama2-tiny", vocab_size=32000, num_kv_heads=4, intermediate_size=192)
    params = {"dim": 64, "n_layers": 2, "n_heads": 4, "multiple_of": 64, "norm_eps": 1e-5, "vocab_size": -1}
    write_meta(root / "llama-2-7b", random_hf_state_dict(cfg, seed=5), params, shards=1)
    shutil.copy(DATA / "llama2-32k.model", root / "tokenizer.model")
    return root


def test_meta_release_takes_its_tokenizer_from_the_parent_folder(meta_layout, tmp_path, capsys):
    src = meta_layout / "llama-2-7b"
    capsys.readouterr()
    assert cli(["convert", "--from", "hf", "--to", "jaxllm", str(src), str(tmp_path / "jx")]) == 0
    out = capsys.readouterr().out
    assert f"tokenizer: {meta_layout / 'tokenizer.model'} (the parent folder, where Meta's release keeps it)" in out
    assert (tmp_path / "jx" / "tokenizer.model").read_bytes() == (meta_layout / "tokenizer.model").read_bytes()
    _, _, tok = load_model(tmp_path / "jx")  # generate and chat need no --tokenizer
    assert tok is not None and tok.vocab_size == 32000 and tok.add_bos
    # --tokenizer names another file; without one anywhere, the line says what generate will need
    other = tmp_path / "tok"
    other.mkdir()
    shutil.copy(DATA / "llama2-32k.model", other / "tokenizer.model")
    assert cli(["convert", "--from", "hf", "--to", "jaxllm", str(src), str(tmp_path / "jx2"), "--tokenizer",
                str(other)]) == 0
    assert f"tokenizer: {other / 'tokenizer.model'} (--tokenizer)" in capsys.readouterr().out
    shutil.copytree(src, tmp_path / "alone" / "llama-2-7b")
    assert cli(["convert", "--from", "hf", "--to", "jaxllm", str(tmp_path / "alone" / "llama-2-7b"),
                str(tmp_path / "jx3")]) == 0
    assert "tokenizer: none beside the weights or in the parent folder; generate and chat will need --tokenizer" \
        in capsys.readouterr().out
    assert not (tmp_path / "jx3" / "tokenizer.model").exists()


@pytest.mark.slow
def test_a_trained_baichuan_run_exports_with_its_code_and_tokenizer_files(tmp_path, load_remote):
    """The whole way: a Baichuan-7B-style release (its code, a tokenizer whose tokenizer_config.json says
    add_bos_token false and names its own tokenizer code) → jaxllm → `train` from it → export of the run →
    trust_remote_code=True loads the trained weights with identical logits; the tokenizer files and code
    come along."""
    from jaxllm.train.config import from_dict
    from jaxllm.train.loop import train

    cfg = get_preset("baichuan-tiny", vocab_size=4096)
    release = tmp_path / "release"
    write_release(release, cfg, stored(random_hf_state_dict(cfg, seed=9), ml_dtypes.bfloat16), "baichuan-7b")
    shutil.copy(Path(__file__).parent.parent / "jaxllm" / "assets" / "demo" / "tokenizer.model", release)
    (release / "tokenizer_config.json").write_text(json.dumps(
        {"add_bos_token": False, "tokenizer_class": "BaiChuanTokenizer",
         "auto_map": {"AutoTokenizer": ["tokenization_baichuan.BaiChuanTokenizer", None]}}))
    (release / "tokenization_baichuan.py").write_text("# the tokenizer's own code: carried, never run here\n")
    assert cli(["convert", "--from", "hf", "--to", "jaxllm", str(release), str(tmp_path / "jx")]) == 0
    run = tmp_path / "run"
    data = {"sources": [{"path": "assets:demo/zh_poems.jsonl.gz"}], "seq_len": 32, "add_bos": False,
            "tokenizer": str(tmp_path / "jx" / "tokenizer.model")}
    result = train(from_dict({"run_dir": str(run), "init_from": str(tmp_path / "jx"), "data": data,
                              "model": {"preset": "baichuan-tiny", "vocab_size": 4096, "dtype": "float32"},
                              "optimizer": {"lr": 1e-2, "warmup_steps": 1}, "mesh": {"data": 1, "fsdp": 4, "tensor": 2},
                              "train": {"steps": 2, "batch_size": 8}, "checkpoint": {"every": 2},
                              "log": {"every": 1, "progress": False}}), log=lambda *_: None)
    assert (run / "tokenizer_config.json").is_file() and (run / "remote_code" / "modeling_baichuan.py").is_file()
    export = tmp_path / "export-trained"
    assert cli(["convert", "--from", "jaxllm", "--to", "hf", str(run), str(export)]) == 0
    for name in ("modeling_baichuan.py", "configuration_baichuan.py", "tokenization_baichuan.py", "tokenizer.model",
                 "tokenizer_config.json"):
        assert (export / name).read_bytes() == (release / name).read_bytes(), name
    model = load_remote(export)
    tokens = np.random.default_rng(5).integers(0, cfg.vocab_size, 20)
    params = jax.tree.map(np.asarray, result.params)
    ours = np.asarray(fwd(read_model_config(run / "checkpoints"), params, jnp.asarray(tokens)[None])[0])
    assert rel_err(ours, torch_logits(model, tokens)) < 1e-5
    _, _, tok = load_model(export)
    assert tok.add_bos is False and tok.add_bos_source.endswith("tokenizer_config.json: add_bos_token")
