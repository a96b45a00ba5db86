"""An independent NumPy (float64) reference of every family's forward, written from the spec's
formulas and reading HF-layout state dicts (W_pack, raw NormHead rows, ALiBi slopes); and Meta's
consolidated layout written from the spec."""
import json
import math

import numpy as np


def baichuan_alibi_slopes(n):
    """Spec §6.4: 2^{-8(h+1)/n} for powers of two; else c = 2^floor(log2 n) slopes of c heads,
    then 2^{-8(2j+1)/(2c)} for j < n - c."""
    c = 2 ** int(math.floor(math.log2(n)))
    slopes = [2.0 ** (-8.0 * (h + 1) / c) for h in range(c)]
    slopes += [2.0 ** (-8.0 * (2 * j + 1) / (2 * c)) for j in range(n - c)]
    return np.array(slopes)


def _rms(x, w, eps):
    return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def _rope(x, pos, theta):  # x [T, heads, d], HF rotate-half layout
    d = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
    ang = pos[:, None] * inv[None]
    cos = np.cos(np.concatenate([ang, ang], -1))[:, None]
    sin = np.sin(np.concatenate([ang, ang], -1))[:, None]
    rot = np.concatenate([-x[..., d // 2:], x[..., : d // 2]], -1)
    return x * cos + rot * sin


def reference_logits(sd, cfg, tokens):
    """sd: HF state dict (numpy); tokens: int[T] (one sequence) → float64 logits [T, vocab]."""
    sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    n, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    T = len(tokens)
    pos = np.arange(T, dtype=np.float64)
    x = sd["model.embed_tokens.weight"][tokens]
    causal = np.tril(np.ones((T, T), bool))
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        a = _rms(x, sd[p + "input_layernorm.weight"], cfg.rms_norm_eps)
        if p + "self_attn.W_pack.weight" in sd:
            wq, wk, wv = np.split(sd[p + "self_attn.W_pack.weight"], 3, axis=0)
        else:
            wq, wk, wv = (sd[p + f"self_attn.{m}_proj.weight"] for m in "qkv")
        q = (a @ wq.T).reshape(T, n, d)
        k = (a @ wk.T).reshape(T, kv, d)
        v = (a @ wv.T).reshape(T, kv, d)
        if cfg.position == "rope":
            q, k = _rope(q, pos, cfg.rope_theta), _rope(k, pos, cfg.rope_theta)
        k = np.repeat(k, n // kv, axis=1)  # repeat_kv: head h uses kv head h // (n/kv)
        v = np.repeat(v, n // kv, axis=1)
        scores = np.einsum("thd,shd->hts", q, k) / math.sqrt(d)
        if cfg.position == "alibi":
            slopes = baichuan_alibi_slopes(n)
            scores = scores + slopes[:, None, None] * (pos[None, None, :] - pos[None, :, None])
        scores = np.where(causal[None], scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        out = np.einsum("hts,shd->thd", probs, v).reshape(T, n * d)
        x = x + out @ sd[p + "self_attn.o_proj.weight"].T
        m = _rms(x, sd[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
        gate = m @ sd[p + "mlp.gate_proj.weight"].T
        up = m @ sd[p + "mlp.up_proj.weight"].T
        x = x + ((gate / (1 + np.exp(-gate))) * up) @ sd[p + "mlp.down_proj.weight"].T
    x = _rms(x, sd["model.norm.weight"], cfg.rms_norm_eps)
    head = sd["lm_head.weight"] if "lm_head.weight" in sd else sd["model.embed_tokens.weight"]
    if cfg.norm_head:
        head = head / np.maximum(np.linalg.norm(head, axis=1, keepdims=True), 1e-12)
    return x @ head.T


def random_hf_state_dict(cfg, seed=0, scale=0.05):
    """Random HF-layout weights for `cfg` (norm weights around 1, so they matter)."""
    from jaxllm.convert.mapping import tensor_maps

    rng = np.random.default_rng(seed)
    sd = {}
    for m in tensor_maps(cfg):
        if m.hf_key.endswith("norm.weight"):
            sd[m.hf_key] = (1.0 + 0.2 * rng.standard_normal(m.hf_shape)).astype(np.float32)
        else:
            sd[m.hf_key] = (scale * rng.standard_normal(m.hf_shape)).astype(np.float32)
    if cfg.norm_head:  # raw NormHead rows far from unit norm, so the normalisation is exercised
        sd["lm_head.weight"] *= rng.uniform(0.5, 3.0, (cfg.vocab_size, 1)).astype(np.float32)
    return sd


# ---- Meta's consolidated.*.pth, written from the spec's formulas (spec §2.2–2.3) ------------------------

META_LAYER = {"self_attn.q_proj.weight": ("attention.wq.weight", 0),
              "self_attn.k_proj.weight": ("attention.wk.weight", 0),
              "self_attn.v_proj.weight": ("attention.wv.weight", 0),
              "self_attn.o_proj.weight": ("attention.wo.weight", 1),
              "mlp.gate_proj.weight": ("feed_forward.w1.weight", 0),
              "mlp.down_proj.weight": ("feed_forward.w2.weight", 1),
              "mlp.up_proj.weight": ("feed_forward.w3.weight", 0),
              "input_layernorm.weight": ("attention_norm.weight", None),
              "post_attention_layernorm.weight": ("ffn_norm.weight", None)}
META_TOP = {"model.embed_tokens.weight": ("tok_embeddings.weight", 1), "model.norm.weight": ("norm.weight", None),
            "lm_head.weight": ("output.weight", 0)}


def meta_rows(hf_weight, heads):
    """Meta's adjacent-pair row order, element by element from spec §2.3:
    HF[h·d + c·d/2 + i] = Meta[h·d + 2i + c]."""
    d = hf_weight.shape[0] // heads
    meta = np.empty_like(hf_weight)
    for h in range(heads):
        for i in range(d // 2):
            for c in (0, 1):
                meta[h * d + 2 * i + c] = hf_weight[h * d + c * (d // 2) + i]
    return meta


def write_meta(directory, sd, params, shards):
    """`consolidated.NN.pth` model-parallel shards + params.json (concatenation dims from spec §2.2)."""
    import torch

    directory.mkdir(parents=True)
    parts = [{} for _ in range(shards)]
    for key, w in sd.items():
        if key.startswith("model.layers."):
            _, _, i, rest = key.split(".", 3)
            name, dim = META_LAYER[rest]
            name = f"layers.{i}.{name}"
            if rest == "self_attn.q_proj.weight":
                w = meta_rows(w, params["n_heads"])
            elif rest == "self_attn.k_proj.weight":
                w = meta_rows(w, params.get("n_kv_heads", params["n_heads"]))
        else:
            name, dim = META_TOP[key]
        pieces = [w] * shards if dim is None else np.split(w, shards, axis=dim)
        for part, piece in zip(parts, pieces):
            part[name] = torch.from_numpy(np.ascontiguousarray(piece))
    for n, part in enumerate(parts):
        part["rope.freqs"] = torch.ones(8)  # Meta's files carry the RoPE table too; it is not a parameter
        torch.save(part, directory / f"consolidated.{n:02d}.pth")
    (directory / "params.json").write_text(json.dumps(params))
