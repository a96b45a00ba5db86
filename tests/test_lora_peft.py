"""LoRA interop with PEFT, both ways and exactly: jaxllm adapters exported with `jaxllm convert --adapter` load with
`peft.PeftModel.from_pretrained` onto `transformers` (Llama) and onto a Baichuan-layout PyTorch model (W_pack),
giving jaxllm's logits; PEFT's own adapters import (and run with `load_model(..., adapter=)`); merges equal
base + adapter."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

from jaxllm.lora import files as adapters
from jaxllm.checkpoint import load_params, save_params
from jaxllm.cli import main as cli
from jaxllm.config import LoraSpec
from jaxllm.convert.core import hf_to_jaxllm
from jaxllm.inference.loading import load_model
from jaxllm.models import forward, init_params
from jaxllm.lora.model import leaf_paths, split, trainable_mask
from test_convert import save_baichuan, save_llama

fwd = jax.jit(forward, static_argnums=0)
TOKENS = np.random.default_rng(3).integers(3, 250, size=(2, 12))


def rel_err(ours, expected):
    return float(np.abs(np.asarray(ours, np.float64) - expected).max() / np.abs(expected).max())


def torch_logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(torch.from_numpy(tokens)).logits.float().numpy()


def jax_logits(path, adapter=None, tokens=TOKENS):
    config, params, _ = load_model(path, adapter=adapter)
    return np.asarray(fwd(config, params, jnp.asarray(tokens)))


def random_adapter(directory, base_dir, base_config, spec, train=(), seed=0):
    """A jaxllm adapter checkpoint with random (nonzero) A and B, as a LoRA run leaves it."""
    config = base_config.replace(lora=spec)
    full = init_params(config, jax.random.key(seed))
    trained, _ = split(full, trainable_mask(full, train))
    rng = np.random.default_rng(seed)
    leaves = {p: (0.1 * rng.standard_normal(x.shape)).astype(np.float32) if p[-1].endswith("_lora_b")
              else np.asarray(x) + (0.05 * rng.standard_normal(x.shape)).astype(np.float32)
              for p, x in zip(leaf_paths(trained), jax.tree.leaves(trained))}
    save_params(directory, adapters.nest(leaves), config)
    adapters.write_record(directory, base=str(base_dir), base_digest=None, train=train)
    return config


# ---- A Baichuan-layout PyTorch model (fused W_pack), as Baichuan's own modeling code defines it --------

class TinyBaichuanConfig(transformers.PretrainedConfig):
    model_type = "tiny_baichuan_test"


class _Layer(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        h, f = c.hidden_size, c.intermediate_size
        self.input_layernorm = _RMSNorm(h, c.rms_norm_eps)
        self.post_attention_layernorm = _RMSNorm(h, c.rms_norm_eps)
        self.self_attn = torch.nn.Module()
        self.self_attn.W_pack = torch.nn.Linear(h, 3 * h, bias=False)
        self.self_attn.o_proj = torch.nn.Linear(h, h, bias=False)
        self.mlp = torch.nn.Module()
        self.mlp.gate_proj = torch.nn.Linear(h, f, bias=False)
        self.mlp.up_proj = torch.nn.Linear(h, f, bias=False)
        self.mlp.down_proj = torch.nn.Linear(f, h, bias=False)
        self.heads = c.num_attention_heads

    def forward(self, x, cos, sin):
        t, h = x.shape[1], x.shape[2]
        q, k, v = self.self_attn.W_pack(self.input_layernorm(x)).unflatten(-1, (3, h)).unbind(-2)
        q, k, v = (z.view(x.shape[0], t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        rot = lambda z: torch.cat([-z[..., z.shape[-1] // 2:], z[..., :z.shape[-1] // 2]], -1)
        q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        att = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.self_attn.o_proj(att.transpose(1, 2).reshape(x.shape))
        m = self.post_attention_layernorm(x)
        return x + self.mlp.down_proj(torch.nn.functional.silu(self.mlp.gate_proj(m)) * self.mlp.up_proj(m))


class _RMSNorm(torch.nn.Module):
    def __init__(self, h, eps):
        super().__init__()
        self.weight, self.eps = torch.nn.Parameter(torch.ones(h)), eps

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class TinyBaichuan(transformers.PreTrainedModel):
    config_class = TinyBaichuanConfig

    def __init__(self, c):
        super().__init__(c)
        self.model = torch.nn.Module()
        self.model.embed_tokens = torch.nn.Embedding(c.vocab_size, c.hidden_size)
        self.model.layers = torch.nn.ModuleList(_Layer(c) for _ in range(c.num_hidden_layers))
        self.model.norm = _RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = torch.nn.Linear(c.hidden_size, c.vocab_size, bias=False)

    def forward(self, input_ids, **_):
        d = self.config.hidden_size // self.config.num_attention_heads
        inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        ang = torch.arange(input_ids.shape[1], dtype=torch.float32)[:, None] * inv
        cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        return transformers.modeling_outputs.CausalLMOutput(logits=self.lm_head(self.model.norm(x)))

    def prepare_inputs_for_generation(self, *args, **kwargs):  # PEFT's causal-LM wrapper asks for it
        raise NotImplementedError


def baichuan_torch(sd, cfg):
    c = TinyBaichuanConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_heads,
                           intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                           rms_norm_eps=cfg.rms_norm_eps)
    model = TinyBaichuan(c).eval()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
    return model


# ---- fixtures: one converted tiny base per layout --------------------------------------------------------

@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    model, cfg = save_llama(root / "hf", "llama2-tiny")
    base = hf_to_jaxllm(root / "hf", root / "base")
    return root, base, lambda: transformers.LlamaForCausalLM.from_pretrained(root / "hf").eval()


@pytest.fixture(scope="module")
def baichuan(tmp_path_factory):
    root = tmp_path_factory.mktemp("baichuan")
    sd, cfg = save_baichuan(root / "hf", "baichuan-tiny")
    base = hf_to_jaxllm(root / "hf", root / "base")
    model = baichuan_torch(sd, cfg)
    assert rel_err(jax_logits(root / "base"), torch_logits(model)) < 1e-4  # the torch model is the reference
    return root, base, lambda: baichuan_torch(sd, cfg)


# ---- jaxllm → PEFT ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["llama-all", "llama-shared-qkv", "baichuan-W_pack", "baichuan-separate-qkv"])
def test_jaxllm_adapter_exports_to_peft_exactly(case, llama, baichuan, tmp_path):
    family, targets = case.split("-", 1)
    root, base, torch_model = llama if family == "llama" else baichuan
    targets = {"all": "all", "shared-qkv": "W_pack,down_proj", "W_pack": "W_pack,o_proj,mlp",
               "separate-qkv": "q_proj,v_proj,o_proj,gate_proj"}[targets]
    train = ("norms", "lm_head") if case == "llama-all" else ()
    random_adapter(tmp_path / "adapter", root / "base", base, LoraSpec(rank=4, alpha=6.0, targets=targets),
                   train=train)
    assert cli(["convert", "--from", "jaxllm", "--to", "hf", str(tmp_path / "adapter"), str(tmp_path / "peft"),
                "--adapter"]) == 0
    written = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    if family == "baichuan":
        assert "W_pack" in written["target_modules"] and "q_proj" not in written["target_modules"]
    if case == "baichuan-separate-qkv":  # q and v: one rank-8 block adapter on W_pack, same alpha/rank
        assert written["rank_pattern"] == {"W_pack": 8} and written["alpha_pattern"] == {"W_pack": 12.0}
    peft_model = peft.PeftModel.from_pretrained(torch_model(), tmp_path / "peft").eval()
    ours = jax_logits(root / "base", adapter=tmp_path / "adapter")
    error = rel_err(ours, torch_logits(peft_model))
    plain = rel_err(jax_logits(root / "base"), torch_logits(peft_model))
    print(f"\n  {case}: jaxllm vs peft logits, relative error {error:.1e} (the base alone: {plain:.1e})")
    assert error < 1e-4 and plain > 1e-2
    # ... and back: the PEFT directory imports to the same adapter (separate q/k/v stay separate)
    assert cli(["convert", "--from", "hf", "--to", "jaxllm", str(tmp_path / "peft"), str(tmp_path / "again"),
                "--adapter", "--base", str(root / "base")]) == 0
    a_config, a_leaves, _ = adapters.load_adapter(tmp_path / "adapter")
    b_config, b_leaves, record = adapters.load_adapter(tmp_path / "again")
    assert b_config.lora == a_config.lora and sorted(record["train"]) == sorted(train)
    assert set(a_leaves) == set(b_leaves) and all(np.array_equal(a_leaves[p], b_leaves[p]) for p in a_leaves)


# ---- PEFT → jaxllm ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "baichuan"])
def test_peft_adapter_imports_and_runs_with_the_same_logits(family, llama, baichuan, tmp_path):
    root, base, torch_model = llama if family == "llama" else baichuan
    targets = ["q_proj", "v_proj", "down_proj"] if family == "llama" else ["W_pack", "o_proj", "up_proj"]
    model = peft.get_peft_model(torch_model(), peft.LoraConfig(r=3, lora_alpha=5, target_modules=targets,
                                                               task_type="CAUSAL_LM",
                                                               modules_to_save=["embed_tokens"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:  # B starts at zero: make the adapter do something
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "peft")
    expected = torch_logits(model.eval())
    direct = jax_logits(root / "base", adapter=tmp_path / "peft")
    assert cli(["convert", "--from", "hf", "--to", "jaxllm", str(tmp_path / "peft"), str(tmp_path / "jx"),
                "--adapter", "--base", str(root / "base")]) == 0
    imported = jax_logits(root / "base", adapter=tmp_path / "jx")
    config, _, record = adapters.load_adapter(tmp_path / "jx")
    assert config.lora.rank == 3 and record["train"] == ["embedding"]
    assert ("qkv" in config.lora.targets) == (family == "baichuan")  # PEFT's W_pack: one A shared by q/k/v
    print(f"\n  {family}: peft adapter → jaxllm logits, relative error {rel_err(imported, expected):.1e}")
    assert rel_err(direct, expected) < 1e-4 and rel_err(imported, expected) < 1e-4
    # merged into the base, as a jaxllm checkpoint and as HF weights: the same logits without the adapter
    assert cli(["convert", "--from", "jaxllm", "--to", "jaxllm", str(tmp_path / "jx"), str(tmp_path / "merged"),
                "--merge"]) == 0
    merged, merged_config = load_params(tmp_path / "merged")
    assert merged_config.lora is None
    assert rel_err(fwd(merged_config, merged, jnp.asarray(TOKENS)), imported) < 1e-5
    if family == "llama":
        assert cli(["convert", "--from", "hf", "--to", "hf", str(tmp_path / "peft"), str(tmp_path / "hf_merged"),
                    "--merge", "--base", str(root / "base")]) == 0
        hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf_merged").eval()
        assert rel_err(torch_logits(hf), expected) < 1e-5


def test_adapter_conversions_refuse_bad_input(llama, tmp_path, capsys):
    root, base, _ = llama
    random_adapter(tmp_path / "adapter", root / "base", base, LoraSpec(rank=2, targets="q_proj"))
    bad = [(["--from", "jaxllm", "--to", "hf", str(tmp_path / "adapter"), str(tmp_path / "x")],
            "is a LoRA adapter: --adapter converts it"),
           (["--from", "hf", "--to", "jaxllm", str(tmp_path / "adapter"), str(tmp_path / "x"), "--adapter"],
            "no adapter_config.json"),
           (["--from", "jaxllm", "--to", "hf", str(root / "base"), str(tmp_path / "x"), "--adapter"],
            "not an adapter")]
    for args, message in bad:
        try:
            code = cli(["convert", *args])
        except SystemExit as exit_:
            code = exit_.code
        assert code == 2 and message in capsys.readouterr().err, message
        assert not (tmp_path / "x").exists()
    # a PEFT adapter that is not plain LoRA is refused by name
    assert cli(["convert", "--from", "jaxllm", "--to", "hf", str(tmp_path / "adapter"), str(tmp_path / "peft"),
                "--adapter"]) == 0
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    assert cli(["convert", "--from", "hf", "--to", "jaxllm", str(tmp_path / "peft"), str(tmp_path / "x"),
                "--adapter", "--base", str(root / "base")]) == 2
    assert "use_dora=True is not supported" in capsys.readouterr().err


def test_reward_model_adapter_exports_as_peft_seq_cls(llama, tmp_path):
    """A reward model's LoRA run (backbone adapters + scalar head) → PEFT's SEQ_CLS adapter with the head as
    `score` in modules_to_save: PeftModel on LlamaForSequenceClassification gives jaxllm's scores."""
    from jaxllm.lora.model import merge
    from jaxllm.stages import reward

    root, base, _ = llama
    config = base.replace(lora=LoraSpec(rank=2, alpha=4.0, targets="q_proj,v_proj,down_proj"))
    full = init_params(config, jax.random.key(1))
    trained, _ = split(full, trainable_mask(full))
    rng = np.random.default_rng(1)
    lora_leaves = {p: (0.1 * rng.standard_normal(x.shape)).astype(np.float32)
                   for p, x in zip(leaf_paths(trained), jax.tree.leaves(trained))}
    head = {"kernel": (rng.standard_normal(config.hidden_size) / 8).astype(np.float32), "bias": np.zeros((), np.float32)}
    save_params(tmp_path / "rm", {"backbone": adapters.nest(lora_leaves), "head": head}, config)
    adapters.write_record(tmp_path / "rm", base=str(root / "base"), base_digest=None, lm_path=("backbone",))
    assert cli(["convert", "--from", "jaxllm", "--to", "hf", str(tmp_path / "rm"), str(tmp_path / "peft"),
                "--adapter", "--base-name", str(root / "hf")]) == 0
    written = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert written["task_type"] == "SEQ_CLS" and "score" in written["modules_to_save"]
    hf = transformers.LlamaForSequenceClassification.from_pretrained(root / "hf", num_labels=1, pad_token_id=0)
    model = peft.PeftModel.from_pretrained(hf, tmp_path / "peft").eval()
    with torch.no_grad():
        expected = model(torch.from_numpy(TOKENS)).logits[:, 0].numpy()
    base_params, _ = load_params(root / "base")
    params = {"backbone": merge(adapters.nest(lora_leaves), {k: v for k, v in base_params.items() if k != "lm_head"}),
              "head": jax.tree.map(jnp.asarray, head)}
    n, t = TOKENS.shape
    ours = reward.scores(config, params, jnp.asarray(TOKENS), jnp.broadcast_to(jnp.arange(t), (n, t)),
                         jnp.ones((n, t), jnp.int32), jnp.full((n,), t - 1))
    plain = reward.scores(config.replace(lora=None), {**params, "backbone": {k: v for k, v in base_params.items()
                                                                           if k != "lm_head"}},
                          jnp.asarray(TOKENS), jnp.broadcast_to(jnp.arange(t), (n, t)), jnp.ones((n, t), jnp.int32),
                          jnp.full((n,), t - 1))
    print(f"\n  reward model: jaxllm vs peft SEQ_CLS scores, relative error {rel_err(ours, expected):.1e}")
    assert rel_err(ours, expected) < 1e-4 and rel_err(plain, expected) > 1e-3
