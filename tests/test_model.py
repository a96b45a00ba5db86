"""The one decoder: exact to PyTorch/NumPy references, cache, sharding, packing, config errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import models, sharding
from jaxllm.config import ConfigError, ModelConfig
from jaxllm.convert.mapping import hf_to_params
from jaxllm.models import (PRESETS, count_params, get_preset, init_kv_cache, init_params, is_unrolled,
                           unroll_layers)
from jaxllm.models import forward as _forward
from jaxllm.models.attention import alibi_slopes
from reference import baichuan_alibi_slopes, random_hf_state_dict, reference_logits

TINY = ["llama2-tiny", "baichuan-tiny", "baichuan-13b-tiny", "baichuan2-tiny", "baichuan2-13b-tiny",
        "ctllm-tiny", "ziya-tiny"]


# One compiled program per (config, shapes) instead of eager op-by-op dispatch.
forward = jax.jit(_forward, static_argnums=0)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


@pytest.mark.parametrize("name,expected", [
    ("llama2-7b", 6_738_415_616), ("llama2-13b", 13_015_864_320), ("llama2-70b", 68_976_648_192),
    ("baichuan-7b", 7_000_559_616), ("baichuan-13b", 13_264_901_120),
    ("baichuan2-7b", 7_505_973_248), ("baichuan2-13b", 13_896_668_160),
    ("ctllm-2b", 2_134_509_568), ("ziya-13b", 13_091_886_080)])
def test_published_parameter_counts_match_spec(name, expected):
    assert count_params(get_preset(name)) == expected


@pytest.mark.parametrize("name", TINY)
def test_logits_match_numpy_reference(name):
    cfg = get_preset(name)
    sd = random_hf_state_dict(cfg, seed=1)
    params = hf_to_params(sd.__getitem__, cfg)
    tokens = np.random.default_rng(0).integers(0, cfg.num_pieces, size=24)
    ours = forward(cfg, params, jnp.asarray(tokens)[None])[0]
    assert rel_err(ours, reference_logits(sd, cfg, tokens)) < 1e-4


@pytest.mark.parametrize("name", ["llama2-tiny", "ctllm-tiny", "ziya-tiny", "baichuan-tiny"])
def test_logits_match_transformers_llama(name):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = get_preset(name)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    sd = random_hf_state_dict(cfg.replace(family="llama"), seed=2)  # q/k/v split, as HF Llama has it
    model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=False)
    tokens = np.random.default_rng(1).integers(0, cfg.num_pieces, size=(2, 20))
    with torch.no_grad():
        expected = model(torch.from_numpy(tokens)).logits.numpy()
    if cfg.family == "baichuan":  # same math as Llama once W_pack is split
        pack = lambda i: np.concatenate([sd[f"model.layers.{i}.self_attn.{m}_proj.weight"] for m in "qkv"])
        packed = {f"model.layers.{i}.self_attn.W_pack.weight": pack(i) for i in range(cfg.num_layers)}
        sd = {**packed, **{k: v for k, v in sd.items() if not any(f"{m}_proj" in k for m in "qkv")}}
    ours = forward(cfg, hf_to_params(sd.__getitem__, cfg), jnp.asarray(tokens))
    assert rel_err(ours, expected) < 1e-4


def test_alibi_slopes_for_40_heads_match_spec():
    slopes = alibi_slopes(40)
    np.testing.assert_allclose(slopes[:4], [0.840896, 0.707107, 0.594604, 0.5], rtol=1e-5)
    np.testing.assert_allclose(slopes[31], 0.00390625, rtol=1e-6)
    np.testing.assert_allclose(slopes[32:], [0.917004, 0.771105, 0.648420, 0.545254, 0.458502,
                                             0.385553, 0.324210, 0.272627], rtol=1e-5)
    for n in (4, 5, 6, 8, 12, 32, 40, 64):
        np.testing.assert_allclose(alibi_slopes(n), baichuan_alibi_slopes(n), rtol=1e-6)


@pytest.mark.parametrize("per_layer", [False, True], ids=["stacked", "per-layer"])
@pytest.mark.parametrize("name", ["llama2-tiny", "baichuan2-13b-tiny"])
def test_kv_cached_decode_matches_full_forward(name, per_layer):
    """Both layouts: stacked (training, GPU/TPU decoding) and per layer (CPU decoding) give the same logits."""
    cfg = get_preset(name)
    params = init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 14), 0, cfg.vocab_size)
    full = forward(cfg, params, tokens)
    if per_layer:
        stacked, params = params, unroll_layers(params)
        assert is_unrolled(params) and not is_unrolled(stacked) and unroll_layers(params) is params
        assert "layers" not in params and sum(k.startswith("blocks_") for k in params) == cfg.num_layers
        np.testing.assert_array_equal(params["blocks_1"]["mlp"]["down"], stacked["layers"]["mlp"]["down"][1])
        assert rel_err(forward(cfg, params, tokens), full) < 1e-6
        with pytest.raises(ValueError, match="per-layer KV cache goes with per-layer parameters"):
            _forward(cfg, stacked, tokens[:, :8], kv_cache=init_kv_cache(cfg, 2, 32, per_layer=True))
    step = jax.jit(lambda p, t, c: _forward(cfg, p, t, kv_cache=c))
    logits, cache = step(params, tokens[:, :8], init_kv_cache(cfg, 2, 32, per_layer=per_layer))
    assert isinstance(cache["k"], tuple) == per_layer
    outs = [logits]
    for t in range(8, 14):
        logits, cache = step(params, tokens[:, t:t + 1], cache)
        outs.append(logits)
    assert int(cache["index"]) == 14
    assert rel_err(jnp.concatenate(outs, 1), full) < 1e-5


@pytest.mark.parametrize("name", ["llama2-tiny", "baichuan2-13b-tiny", "ctllm-tiny"])
def test_sharded_forward_matches_single_device(name):
    cfg = get_preset(name)
    params = init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (8, 16), 0, cfg.vocab_size)
    single = forward(cfg, params, tokens)
    mesh = sharding.make_mesh(data=1, fsdp=2, tensor=4)
    shardings = models.param_shardings(cfg, mesh)
    with jax.set_mesh(mesh), sharding.axis_rules():
        sharded_params = init_params(cfg, jax.random.key(0), shardings)
        out = forward(cfg, sharded_params, jax.device_put(tokens, sharding.batch_sharding(mesh)))
    assert rel_err(out, single) < 1e-5
    # The rules table's layout, written out: FSDP on embed, tensor parallel on heads/mlp/vocab.
    layers = sharded_params["layers"]
    P = jax.sharding.PartitionSpec
    assert layers["mlp"]["gate"].sharding.spec == P(None, "fsdp", "tensor")
    assert layers["mlp"]["down"].sharding.spec == P(None, "tensor", "fsdp")
    assert sharded_params["embedding"].sharding.spec == P("tensor", "fsdp")
    # Head counts that do not split over tensor=4 (2 KV heads, ALiBi's 5 heads) are replicated there
    heads_axis = lambda count: "tensor" if count % 4 == 0 else None
    assert layers["attn"]["wq"].sharding.spec == P(None, "fsdp", heads_axis(cfg.num_heads), None)
    assert layers["attn"]["wk"].sharding.spec == P(None, "fsdp", heads_axis(cfg.num_kv_heads), None)
    gate = layers["mlp"]["gate"]
    assert {s.data.size for s in gate.addressable_shards} == {gate.size // 8}  # each device holds 1/8


@pytest.mark.parametrize("name", ["llama2-tiny", "baichuan-13b-tiny"])
def test_packed_segments_equal_documents_one_by_one(name):
    cfg = get_preset(name)
    params = init_params(cfg, jax.random.key(0))
    docs = [np.arange(3, 12), np.arange(40, 47), np.arange(100, 104)]
    tokens = np.concatenate(docs)[None]
    segments = np.concatenate([np.full(len(d), i + 1) for i, d in enumerate(docs)])[None]
    positions = np.concatenate([np.arange(len(d)) for d in docs])[None]
    packed = forward(cfg, params, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segments))[0]
    start = 0
    for doc in docs:
        alone = forward(cfg, params, jnp.asarray(doc)[None])[0]
        assert rel_err(packed[start:start + len(doc)], alone) < 1e-5
        start += len(doc)


@pytest.mark.parametrize("name", ["llama2-tiny", "baichuan-13b-tiny"])
def test_attention_implementations_agree(name):
    """jax.nn.dot_product_attention (ALiBi as a bias) equals the einsum path, packed segments included."""
    base = get_preset(name)
    params = init_params(base, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, base.vocab_size)
    segments = jnp.asarray([[1] * 5 + [2] * 7, [1] * 12])
    positions = jnp.asarray([list(range(5)) + list(range(7)), list(range(12))])
    ref = forward(base.replace(attention="reference"), params, tokens, positions, segments)
    assert rel_err(forward(base.replace(attention="xla"), params, tokens, positions, segments), ref) < 1e-5


def test_auto_attention_picks_cudnn_only_on_gpu_in_half_precision(monkeypatch):
    from jaxllm.models.attention import _fused_impl
    assert _fused_impl("auto", jnp.bfloat16, causal=True) is None  # CPU: the einsum path
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert _fused_impl("auto", jnp.bfloat16, causal=True) == "cudnn"
    assert _fused_impl("auto", jnp.float32, causal=True) is None      # cuDNN's flash kernel is half precision
    assert _fused_impl("auto", jnp.bfloat16, causal=False) is None    # decoding against a KV cache
    assert _fused_impl("xla", jnp.float32, causal=False) == "xla"


@pytest.mark.parametrize("policy", ["full", "dots", "save_qkv_out"])
def test_remat_policies_do_not_change_gradients(policy):
    cfg = get_preset("llama2-tiny")
    params = init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, cfg.vocab_size)
    loss = lambda c: jax.jit(jax.grad(lambda p: _forward(c, p, tokens).mean()))(params)
    grads, remat_grads = loss(cfg), loss(cfg.replace(remat=policy))
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(remat_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_remat_policies_change_what_the_backward_pass_keeps():
    """full keeps only the layer inputs, the named policies keep their names or matmuls, none keeps all."""
    import contextlib
    import io
    cfg = get_preset("llama2-tiny")
    params = init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, cfg.vocab_size)

    def residuals(policy):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            jax.ad_checkpoint.print_saved_residuals(
                lambda p: _forward(cfg.replace(remat=policy), p, tokens).mean(), params)
        return len(out.getvalue().splitlines())

    counts = {policy: residuals(policy) for policy in ("none", "full", "save_qkv_out", "dots")}
    assert counts["full"] < counts["save_qkv_out"] < counts["none"], counts
    assert counts["full"] < counts["dots"] < counts["none"], counts


def test_bfloat16_parameters_and_compute():
    cfg = get_preset("llama2-tiny").replace(dtype="bfloat16", param_dtype="bfloat16")
    params = init_params(cfg, jax.random.key(0))
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, cfg.vocab_size)
    f32 = jax.tree.map(lambda x: x.astype(jnp.float32), params)
    logits = forward(cfg, params, tokens)
    assert logits.dtype == jnp.float32  # logits and losses stay float32
    assert rel_err(logits, forward(cfg.replace(dtype="float32", param_dtype="float32"), f32, tokens)) < 5e-2


def test_tied_embeddings_match_numpy_reference():
    """Tied input/output embeddings (no lm_head leaf); the output matrix is the embedding's transpose."""
    cfg = get_preset("llama2-tiny").replace(tie_embeddings=True)
    sd = random_hf_state_dict(cfg, seed=3)
    params = hf_to_params(sd.__getitem__, cfg)
    assert "lm_head" not in params
    tokens = np.random.default_rng(0).integers(0, cfg.num_pieces, size=16)
    ours = forward(cfg, params, jnp.asarray(tokens)[None])[0]
    assert rel_err(ours, reference_logits(sd, cfg, tokens)) < 1e-4


def test_bfloat16_compute_stays_close_to_float32():
    cfg = get_preset("llama2-tiny")
    params = init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, cfg.vocab_size)
    bf16 = forward(cfg.replace(dtype="bfloat16"), params, tokens)
    assert bf16.dtype == jnp.float32
    assert rel_err(bf16, forward(cfg, params, tokens)) < 5e-2


@pytest.mark.parametrize("fields,message", [
    (dict(hidden_size=64, num_heads=5), "num_heads=5 does not divide model.hidden_size=64"),
    (dict(num_heads=4, num_kv_heads=3), "num_kv_heads=3 does not divide model.num_heads=4"),
    (dict(position="alibbi"), "model.position must be one of"),
    (dict(remat="everything"), "model.remat"),
    (dict(vocab_size=0), "model.vocab_size must be a positive integer"),
])
def test_bad_config_fails_at_construction_naming_the_field(fields, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        ModelConfig(**{"hidden_size": 64, "num_heads": 4, "intermediate_size": 128, **fields})


def test_unknown_preset_suggests_the_closest():
    with pytest.raises(ConfigError, match="unknown preset 'llama2-7B'.*did you mean 'llama2-7b'"):
        get_preset("llama2-7B")


def test_presets_command_prints_every_preset(capsys):
    from jaxllm.cli import main
    assert main(["presets", "--all"]) == 0
    out = capsys.readouterr().out
    for name in PRESETS:
        assert name in out
    assert "6,738,415,616" in out and "13,896,668,160" in out and "2,134,509,568" in out


def test_last_only_equals_the_last_position_of_the_full_forward():
    cfg = get_preset("baichuan2-tiny")
    params = init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 10), 0, cfg.vocab_size)
    full = forward(cfg, params, tokens)
    last = jax.jit(lambda p, t: _forward(cfg, p, t, last_only=True))(params, tokens)
    assert last.shape == (2, 1, cfg.vocab_size)
    assert rel_err(last[:, 0], full[:, -1]) < 1e-6
