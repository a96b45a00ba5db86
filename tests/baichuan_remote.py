"""Upstream-compatible Baichuan remote code, written for the tests (not upstream's files): the same module
and class names, config fields and state-dict layout as baichuan-inc's checkpoints load with
`trust_remote_code=True` — `W_pack`, NormHead (Baichuan 2), ALiBi (13B files, `_get_interleave` /
`_gen_alibi_mask`) or RoPE (7B files, `inv_freq` a persistent buffer in Baichuan-7B's)."""
import json
from pathlib import Path

CONFIGURATION = '''
from transformers import PretrainedConfig


class {prefix}Config(PretrainedConfig):
    model_type = "baichuan"

    def __init__(self, vocab_size=64000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, hidden_act="silu", max_position_embeddings=4096, model_max_length=4096,
                 initializer_range=0.02, rms_norm_eps=1e-6, use_cache=True, pad_token_id=0, bos_token_id=1,
                 eos_token_id=2, tie_word_embeddings=False, z_loss_weight=0.0, **kwargs):
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.hidden_act, self.initializer_range, self.rms_norm_eps = hidden_act, initializer_range, rms_norm_eps
        self.max_position_embeddings, self.model_max_length = max_position_embeddings, model_max_length
        self.use_cache, self.z_loss_weight = use_cache, z_loss_weight
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
'''

MODELING_HEAD = '''
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_baichuan import {prefix}Config


class RMSNorm(nn.Module):
    def __init__(self, hidden_size, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.epsilon = eps

    def forward(self, x):
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x.float() * torch.rsqrt(variance + self.epsilon)).to(self.weight.dtype)
'''

MODELING_POSITIONS = {
    # 13B files: an additive bias slope_h * (j - i) below the diagonal, -inf above
    "alibi": '''

def _get_interleave(n):
    c = 2 ** math.floor(math.log2(n))  # slopes of c heads, then every other slope of 2c heads
    return [2 ** (-8 * (h + 1) / c) for h in range(c)] + [2 ** (-8 * (2 * j + 1) / (2 * c)) for j in range(n - c)]


def _gen_alibi_mask(n_head, length):
    slopes = torch.tensor(_get_interleave(n_head), dtype=torch.float32)
    pos = torch.arange(length, dtype=torch.float32)
    bias = slopes[:, None, None] * (pos[None, None, :] - pos[None, :, None])
    return bias.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))


def position_setup(module):
    pass


def position_bias(module, n_head, length):
    return _gen_alibi_mask(n_head, length)


def position_rotate(module, q, k):
    return q, k
''',
    # 7B files: rotate-half rotary embeddings
    "rope": '''

class RotaryEmbedding(nn.Module):
    def __init__(self, dim, base=10000):
        super().__init__()
        self.dim, self.base = dim, base
        {buffer}

    def frequencies(self):
        return 1.0 / (self.base ** (torch.arange(0, self.dim, 2).float() / self.dim))

    def forward(self, length):
        freqs = torch.arange(length, dtype=torch.float32)[:, None] * {inv_freq}[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


def rotate_half(x):
    return torch.cat((-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]), dim=-1)


def position_setup(module):
    module.rotary_emb = RotaryEmbedding(module.head_dim)


def position_bias(module, n_head, length):
    return torch.zeros(length, length).masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1),
                                                   float("-inf"))[None]


def position_rotate(module, q, k):
    cos, sin = module.rotary_emb(q.shape[2])
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
'''}

MODELING_BODY = '''

class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.hidden_size, self.num_heads = config.hidden_size, config.num_attention_heads
        self.head_dim = self.hidden_size // self.num_heads
        self.W_pack = nn.Linear(self.hidden_size, 3 * self.hidden_size, bias=False)
        self.o_proj = nn.Linear(self.hidden_size, self.hidden_size, bias=False)
        position_setup(self)

    def forward(self, x):
        batch, length, _ = x.shape
        heads = lambda t: t.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        q, k, v = (heads(t) for t in self.W_pack(x).split(self.hidden_size, dim=-1))  # rows q | k | v
        q, k = position_rotate(self, q, k)
        scores = q @ k.transpose(2, 3) / math.sqrt(self.head_dim) + position_bias(self, self.num_heads, length)
        out = torch.softmax(scores.float(), dim=-1).to(v.dtype) @ v
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, self.hidden_size))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.self_attn, self.mlp = Attention(config), MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


{norm_head}class {prefix}PreTrainedModel(PreTrainedModel):
    config_class = {prefix}Config
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]

    def _init_weights(self, module):
        if getattr(module, "weight", None) is not None and module.weight.dim() == 2:  # Linear, Embedding, head
            module.weight.data.normal_(mean=0.0, std=self.config.initializer_range)


class {prefix}Model({prefix}PreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([DecoderLayer(config) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def forward(self, input_ids):
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


class {prefix}ForCausalLM({prefix}PreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.model = {prefix}Model(config)
        self.lm_head = {head}
        self.post_init()

    def forward(self, input_ids, **kwargs):
        return CausalLMOutputWithPast(logits=self.lm_head(self.model(input_ids)).float())
'''

NORM_HEAD = '''class NormHead(nn.Module):
    def __init__(self, hidden_size, vocab_size):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))

    def forward(self, x):
        return F.linear(x, F.normalize(self.weight))


'''

# (position, NormHead, class prefix, inv_freq persistent) of each upstream variant
VARIANTS = {"baichuan-7b": ("rope", False, "BaiChuan", True), "baichuan-13b": ("alibi", False, "Baichuan", False),
            "baichuan2-7b": ("rope", True, "Baichuan", False), "baichuan2-13b": ("alibi", True, "Baichuan", False)}


def write_remote_code(directory, variant):
    """configuration_baichuan.py and modeling_baichuan.py of `variant`; returns config.json's auto_map."""
    position, norm_head, prefix, persistent = VARIANTS[variant]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    head = ("NormHead(config.hidden_size, config.vocab_size)" if norm_head
            else "nn.Linear(config.hidden_size, config.vocab_size, bias=False)")
    # Baichuan-7B registers inv_freq as a (persistent) buffer; Baichuan2-7B's is no buffer at all
    positions = MODELING_POSITIONS[position].replace(
        "{buffer}", 'self.register_buffer("inv_freq", self.frequencies())' if persistent else "pass").replace(
        "{inv_freq}", "self.inv_freq" if persistent else "self.frequencies()")
    (directory / "configuration_baichuan.py").write_text(CONFIGURATION.replace("{prefix}", prefix))
    modeling = (MODELING_HEAD + positions + MODELING_BODY).replace("{prefix}", prefix).replace("{head}", head)
    modeling = modeling.replace("{norm_head}", NORM_HEAD if norm_head else "")
    (directory / "modeling_baichuan.py").write_text(modeling)
    return {"AutoConfig": f"configuration_baichuan.{prefix}Config",
            "AutoModelForCausalLM": f"modeling_baichuan.{prefix}ForCausalLM"}


def released_config(cfg, auto_map):
    """config.json as baichuan-inc releases it: no position field (the modeling code decides), the
    architecture named by the modeling code, torch_dtype bfloat16."""
    arch = auto_map["AutoModelForCausalLM"].rsplit(".", 1)[1]
    return {"architectures": [arch], "auto_map": auto_map, "model_type": "baichuan", "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads, "vocab_size": cfg.vocab_size, "rms_norm_eps": cfg.rms_norm_eps,
            "hidden_act": "silu", "model_max_length": cfg.max_position_embeddings,
            "max_position_embeddings": cfg.max_position_embeddings, "initializer_range": 0.02,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "tie_word_embeddings": False,
            "torch_dtype": "bfloat16", "use_cache": True}


def write_release(directory, cfg, sd, variant):
    """A Baichuan release directory: remote code, config.json, the state dict as bf16 safetensors shards."""
    from safetensors.numpy import save_file

    auto_map = write_remote_code(directory, variant)
    (Path(directory) / "config.json").write_text(json.dumps(released_config(cfg, auto_map)))
    keys = list(sd)
    half = len(keys) // 2
    weight_map = {}
    for i, chunk in enumerate((keys[:half], keys[half:])):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: sd[k] for k in chunk}, str(Path(directory) / name))
        weight_map.update({k: name for k in chunk})
    index = {"metadata": {}, "weight_map": weight_map}
    (Path(directory) / "model.safetensors.index.json").write_text(json.dumps(index))
