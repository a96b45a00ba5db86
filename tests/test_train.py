"""Run configs (recipes, overrides, errors), the optimizer, the loss and the jitted train step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxllm.config import ConfigError
from jaxllm.models import get_preset, init_params, param_logical_axes
from jaxllm.train import flops
from jaxllm.train.config import (CONFIGS_DIR, OptimizerConfig, RunConfig, config_differences, from_dict,
                                 load_config)
from jaxllm.train.loss import lm_loss, max_z_loss, token_nll
from jaxllm.train.optim import decay_mask, make_optimizer, make_schedule
from jaxllm.train.rundir import RunDirError, prepare
from jaxllm.train.step import make_train_step

CONFIGS = sorted(CONFIGS_DIR.glob("*-pretrain.yaml")) + [CONFIGS_DIR / "demo.yaml"]  # the pretraining recipes


# ----------------------------------------------------------------------------------------- configs

@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_recipe_loads(path):
    config = load_config(path)
    assert config.optimizer.decay_steps >= config.train.steps or config.optimizer.schedule == "constant"
    assert config.data.sources and config.data.tokenizer


def test_recipes_carry_the_spec_hyperparameters():
    llama = load_config(next(p for p in CONFIGS if p.stem == "llama2-7b-pretrain"))
    o = llama.optimizer
    assert (o.lr, o.b1, o.b2, o.eps, o.weight_decay, o.clip_norm, o.warmup_steps, o.min_lr_ratio) == \
        (3e-4, 0.9, 0.95, 1e-5, 0.1, 1.0, 2000, 0.1)
    assert llama.data.seq_len == 4096 and llama.train.batch_size * 4096 == 4 * 1024 * 1024
    assert llama.model.dtype == "bfloat16" and llama.model.param_dtype == "float32"
    baichuan2 = load_config(next(p for p in CONFIGS if p.stem == "baichuan2-7b-pretrain"))
    assert baichuan2.model.z_loss_weight == 2e-4 and baichuan2.model.norm_head
    ctllm = load_config(next(p for p in CONFIGS if p.stem == "ctllm-2b-pretrain"))
    assert [s.weight for s in ctllm.data.sources] == [800, 300, 100]  # zh : en : code tokens


def test_overrides_parse_types_and_index_lists():
    config = load_config(None, ["model.preset=llama2-tiny", "optimizer.lr=1e-3", "train.steps=7",
                                "optimizer.warmup_steps=2",
                                "data.sources=[{path: a.jsonl, weight: 2}, b.txt]", "data.sources.1.weight=0.5",
                                "checkpoint.keep=null", "log.tensorboard=false", "data.tokenizer=t.model",
                                "data.seq_len=32"])
    assert config.optimizer.lr == 1e-3 and isinstance(config.optimizer.lr, float)
    assert config.train.steps == 7 and config.optimizer.decay_steps == 7
    assert [(s.path, s.weight) for s in config.data.sources] == [("a.jsonl", 2.0), ("b.txt", 0.5)]
    assert config.checkpoint.keep is None and config.log.tensorboard is False
    assert config.model.name == "llama2-tiny" and config.model.dtype == "bfloat16"  # training default


@pytest.mark.parametrize("override,message", [
    ("optimizer.lrr=1", r"unknown config key 'optimizer.lrr' \(did you mean 'optimizer.lr'\?\)"),
    ("trian.steps=3", r"unknown config key 'trian' \(did you mean 'train'\?\)"),
    ("model.hiden_size=8", r"unknown config key 'model.hiden_size' \(did you mean 'model.hidden_size'\?\)"),
    ("data.seq_lne=8", r"unknown config key 'data.seq_lne' \(did you mean 'data.seq_len'\?\)"),
    ("train.steps=many", r"train.steps must be int, got 'many'"),
    ("model.preset=llama2-tinny", r"unknown preset 'llama2-tinny' \(did you mean 'llama2-tiny'\?\)"),
    ("train.grad_accum=3", r"train.grad_accum=3 does not divide train.batch_size=8"),
    ("optimizer.schedule=cosin", r"optimizer.schedule must be one of"),
    ("train.steps=10", r"optimizer.decay_steps=10 \(default: train.steps\) must exceed optimizer.warmup_steps"),
    ("steps", r"override 'steps' is not of the form key=value"),
])
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_run_dir_with_another_config_is_refused(tmp_path):
    base = {"run_dir": str(tmp_path / "run"), "model": {"preset": "llama2-tiny"},
            "optimizer": {"warmup_steps": 10}}
    prepare(tmp_path / "run", from_dict(base))
    prepare(tmp_path / "run", from_dict({**base, "log": {"every": 3}, "mesh": {"fsdp": 2}}))  # same run
    with pytest.raises(RunDirError, match=r"different config \(optimizer.lr: 0.0003 → 0.001\)"):
        prepare(tmp_path / "run", from_dict({**base, "optimizer": {"lr": 1e-3, "warmup_steps": 10}}))
    with pytest.raises(RunDirError, match=r"keep optimizer.decay_steps=1000"):
        prepare(tmp_path / "run", from_dict({**base, "train": {"steps": 2000}}))
    prepare(tmp_path / "run", from_dict({**base, "train": {"steps": 2000},
                                         "optimizer": {"decay_steps": 1000, "warmup_steps": 10}}))
    assert config_differences(RunConfig().to_dict(), RunConfig().to_dict()) == []


# ----------------------------------------------------------------------------------------- optimizer

def test_schedule_warms_up_then_decays_to_ten_percent():
    schedule = make_schedule(OptimizerConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1), total_steps=110)
    values = np.array([schedule(s) for s in (0, 5, 10, 60, 110, 500)])
    np.testing.assert_allclose(values, [0.0, 0.5, 1.0, 0.55, 0.1, 0.1], atol=1e-6)
    constant = make_schedule(OptimizerConfig(lr=2.0, schedule="constant", warmup_steps=0), 10)
    assert float(constant(7)) == 2.0


def test_warmup_fraction_with_a_floor():
    # Llama 2's RM recipe: warmup 3 % of the steps, at least 5 (spec §3.3).
    config = load_config(CONFIGS_DIR / "llama2-7b-rm.yaml").optimizer
    for total, warmup in ((1000, 30), (100, 5), (2001, 61)):
        schedule = make_schedule(config, total)
        assert float(schedule(warmup)) == pytest.approx(config.lr) and float(schedule(warmup - 1)) < config.lr
    with pytest.raises(ConfigError, match="warmup_fraction"):
        load_config(CONFIGS_DIR / "demo.yaml", ["optimizer.warmup_fraction=1.5"])


def test_weight_decay_skips_norms_only():
    mask = decay_mask(param_logical_axes(get_preset("llama2-tiny")))
    assert mask["embedding"] and mask["lm_head"] and mask["layers"]["attn"]["wq"]
    assert not mask["final_norm"]["scale"] and not mask["layers"]["attn_norm"]["scale"]


def test_mfu_counts_causal_attention_once():
    cfg = get_preset("llama2-7b")
    assert flops.flops_per_token(cfg, 4096) == pytest.approx(40.43e9 + 3.22e9, rel=2e-3)  # spec §9 table
    assert flops.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert flops.peak_flops("TPU v5 lite") == 197e12 and flops.peak_flops("cpu") is None
    assert flops.mfu(1000.0, 1e9, 2, 1e12) == 0.5


def test_mfu_formula_counts_the_flops_xla_compiles():
    """The MFU numerator is what the model computes: XLA's own FLOP count of the compiled forward and train
    step matches the per-matmul count 2(N - V·E) + 4·L·H·Q·T per token (the embedding lookup is free, the
    attention scores and AV product are computed in full), and 3× that for forward + backward. One layer,
    because XLA's cost analysis counts a scanned layer's loop body once."""
    from jaxllm.models import count_params, forward, param_shapes

    cfg = get_preset("llama2-7b", hidden_size=512, intermediate_size=1344, num_heads=8, num_kv_heads=2,
                     num_layers=1, vocab_size=2048, remat="none")
    batch, seq = 2, 256
    matmuls = 2 * (count_params(cfg) - cfg.vocab_size * cfg.hidden_size) + 4 * cfg.num_heads * cfg.head_dim * seq
    params = param_shapes(cfg)

    def xla_flops(fn, *args):
        return fn.lower(*args).compile().cost_analysis()["flops"] / (batch * seq)

    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    assert xla_flops(jax.jit(lambda p, t: forward(cfg, p, t)), params, tokens) == pytest.approx(matmuls, rel=0.01)
    optimizer, schedule = make_optimizer(OptimizerConfig(warmup_steps=1), 10, param_logical_axes(cfg))
    row = jax.ShapeDtypeStruct((1, batch, seq), jnp.int32)
    data = {"tokens": row, "targets": row, "segment_ids": row, "positions": row,
            "loss_mask": jax.ShapeDtypeStruct((1, batch, seq), jnp.float32)}
    step = jax.jit(make_train_step(lm_loss(cfg), optimizer, schedule))
    train = xla_flops(step, params, jax.eval_shape(optimizer.init, params), data, jax.random.key(0), jnp.int32(0))
    assert train == pytest.approx(3 * matmuls, rel=0.03)  # the rest: norms, softmax, AdamW
    # What the MFU column reports: spec §9's 6N + 6·L·H·Q·T, i.e. the above with the embedding counted
    # as a matmul and the attention halved for causality.
    assert flops.flops_per_token(cfg, seq) == (3 * matmuls + 6 * cfg.vocab_size * cfg.hidden_size
                                               - 6 * cfg.num_heads * cfg.head_dim * seq)


# ----------------------------------------------------------------------------------------- loss and step

CFG = get_preset("llama2-tiny")


@pytest.fixture(scope="module")
def setup():
    params = init_params(CFG, jax.random.key(0))
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, CFG.vocab_size, (8, 17)).astype(np.int32)
    mask = (rng.random((8, 16)) > 0.2).astype(np.float32)  # uneven tokens per micro-batch
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask,
             "segment_ids": np.ones((8, 16), np.int32), "positions": np.tile(np.arange(16, dtype=np.int32), (8, 1))}
    optimizer, schedule = make_optimizer(OptimizerConfig(lr=1e-2, warmup_steps=0), 10, param_logical_axes(CFG))
    return params, batch, optimizer, schedule


def test_loss_is_masked_cross_entropy_plus_max_z():
    logits = jnp.array([[[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]]])
    targets = jnp.array([[0, 1]])
    nll = token_nll(logits, targets)
    expected = [jax.nn.logsumexp(logits[0, 0]) - 2.0, jax.nn.logsumexp(logits[0, 1]) - 0.5]
    np.testing.assert_allclose(nll[0], expected, rtol=1e-6)
    assert float(max_z_loss(logits)) == pytest.approx((2.0 ** 2 + 3.0 ** 2) / 2)  # every position (spec §6.3)


@pytest.mark.parametrize("z_weight, full_rows", [(0.0, False), (1e-3, True)], ids=["uneven-masks", "max-z"])
def test_accumulating_k_micro_batches_equals_one_batch_of_k(setup, z_weight, full_rows):
    """Exact for CE with uneven target counts; with the max-z term (a mean over all positions) exact when
    micro-batches hold equal target counts, as packed pretraining rows do."""
    params, batch, _, _ = setup
    if full_rows:
        batch = {**batch, "loss_mask": np.ones_like(batch["loss_mask"])}
    sgd = optax.sgd(1.0)  # the update is the gradient itself
    jitted_step = jax.jit(make_train_step(lm_loss(CFG, z_loss_weight=z_weight), sgd))
    opt_state = sgd.init(params)
    rng, zero = jax.random.key(1), jnp.int32(0)
    whole = jax.tree.map(lambda x: x[None], batch)                      # [1, 8, seq]
    split = jax.tree.map(lambda x: x.reshape(4, 2, *x.shape[1:]), batch)  # [4, 2, seq]
    p1, _, m1 = jitted_step(params, opt_state, whole, rng, zero)
    p4, _, m4 = jitted_step(params, opt_state, split, rng, zero)
    for key in ("loss", "z_loss", "grad_norm"):
        np.testing.assert_allclose(m4[key], m1[key], rtol=2e-5)
    for a, b, p in zip(jax.tree.leaves(p4), jax.tree.leaves(p1), jax.tree.leaves(params)):
        np.testing.assert_allclose(a - p, b - p, rtol=1e-4, atol=1e-7)
    assert (float(m1["z_loss"]) > 0) == (z_weight > 0) and int(m1["skipped"]) == 0


def test_non_finite_loss_skips_the_update(setup):
    params, batch, optimizer, schedule = setup

    def poisoned(p, b, rng):  # NaN whenever the first token is 3
        loss, metrics = lm_loss(CFG)(p, b, rng)
        return loss * jnp.where(b["tokens"][0, 0] == 3, jnp.nan, 1.0), metrics

    step = jax.jit(make_train_step(poisoned, optimizer, schedule))
    opt_state = optimizer.init(params)
    with_first = lambda value: jax.tree.map(lambda x: x[None], {**batch, "tokens": _first(batch["tokens"], value)})
    new_params, new_state, metrics = step(params, opt_state, with_first(3), jax.random.key(0), jnp.int32(0))
    assert int(metrics["skipped"]) == 1
    for a, b in zip(jax.tree.leaves((new_params, new_state)), jax.tree.leaves((params, opt_state))):
        np.testing.assert_array_equal(a, b)
    # The loop's step 1 after a skipped step 0: the schedule has not advanced, and the logged rate says so.
    new_params, _, metrics = step(params, new_state, with_first(4), jax.random.key(0), jnp.int32(1))
    assert int(metrics["skipped"]) == 0
    assert float(metrics["lr"]) == pytest.approx(float(schedule(0))) and schedule(1) < schedule(0)
    assert not np.array_equal(new_params["embedding"], params["embedding"])


def _first(tokens, value):
    tokens = np.array(tokens)
    tokens[0, 0] = value
    return tokens


def test_optimizer_is_adamw_with_clipping(setup):
    params, _, _, _ = setup
    optimizer, _ = make_optimizer(OptimizerConfig(lr=0.1, warmup_steps=0, clip_norm=1.0, weight_decay=0.0,
                                                  schedule="constant"), 10, param_logical_axes(CFG))
    grads = jax.tree.map(lambda p: jnp.full_like(p, 100.0), params)
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    reference = optax.adamw(0.1, b1=0.9, b2=0.95, eps=1e-5, weight_decay=0.0)
    ref_updates, _ = reference.update(optax.clip_by_global_norm(1.0).update(grads, None)[0],
                                      reference.init(params), params)
    np.testing.assert_allclose(updates["lm_head"], ref_updates["lm_head"], rtol=1e-6)
