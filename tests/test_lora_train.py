"""LoRA runs on the one train loop: only the adapters train (no update, gradient, optimizer state or checkpoint
space for the frozen base), the assistant loss falls, a killed run resumes bit-identically and refuses another
base, DPO's reference is the base with adapters off, and the lora: section's bad input is one clear line."""
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.lora import files as adapters
from jaxllm.checkpoint import load_params, save_params
from jaxllm.cli import main as cli
from jaxllm.config import ConfigError
from jaxllm.models import forward, get_preset, init_params
from jaxllm.lora.quant import QuantizedWeight
from jaxllm.stages.data import encode_sft, pack_examples
from jaxllm.stages.stages import StageOptions, dpo_stage, load_stage_recipe, rm_stage, sft_stage
from jaxllm.tokenizer import Tokenizer, get_chat_template
from jaxllm.train.config import load_config
from jaxllm.train.loop import plan_run, train
from jaxllm.train.loss import token_nll

ASSETS = Path(__file__).resolve().parent.parent / "jaxllm" / "assets"
MODEL = {"preset": "llama2-tiny", "vocab_size": 4096, "dtype": "float32"}
LORA = {"rank": 4, "alpha": 8, "dropout": 0.05}


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """A tiny 'pretrained' base checkpoint."""
    directory = tmp_path_factory.mktemp("start") / "ckpt"
    cfg = get_preset("llama2-tiny", vocab_size=4096)
    save_params(directory, jax.tree.map(np.asarray, init_params(cfg, jax.random.key(42))), cfg)
    return directory


def lora_config(tmp_path, name, start, sample="sft_sample.jsonl", steps=12, lora=None, **extra):
    base = {"run_dir": str(tmp_path / name), "seed": 0, "init_from": str(start), "model": dict(MODEL),
            "data": {"sources": [{"name": "d", "path": str(ASSETS / "stages" / sample)}],
                     "tokenizer": str(ASSETS / "demo" / "tokenizer.model"), "seq_len": 96},
            "optimizer": {"lr": 1e-2, "warmup_steps": 0, "schedule": "constant", "weight_decay": 0.0,
                          "decay_steps": 100},
            "mesh": {"data": 1, "fsdp": 4, "tensor": 2}, "train": {"steps": steps, "batch_size": 8},
            "checkpoint": {"every": 5, "keep": 3, "async_save": False},
            "log": {"every": 1, "progress": False, "tensorboard": False, "plot": False},
            "lora": {**LORA, **(lora or {})}}
    base.update(extra)
    return load_config(None, [], base=base)


def flat(tree):
    return {"/".join(str(getattr(k, "key", k)) for k in p): np.asarray(x)
            for p, x in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, start):
    config = lora_config(tmp_path_factory.mktemp("sft"), "run", start)
    seen = []
    result = train(config, sft_stage(config, StageOptions(), log=quiet), on_step=lambda s, m: seen.append(m), log=quiet)
    return config, result, seen


def test_only_the_adapters_train_and_are_saved(sft_run, start):
    config, result, _ = sft_run
    trained = flat(result.params)
    assert trained and all(k.endswith(("_lora_a", "_lora_b")) for k in trained)
    assert len(trained) == 14  # A and B of q, k, v, o, gate, up, down
    # Adam moments exist for the adapters only: twice their size, nothing for the base
    moments = sum(x.size for x in jax.tree.leaves(result.opt_state) if x.ndim > 0)
    assert moments == 2 * sum(x.size for x in trained.values())
    # the frozen base is the starting checkpoint, bit for bit, after 12 updates
    base, _ = load_params(start)
    frozen, original = flat(result.frozen), flat(base)
    assert set(frozen) == set(original) and all(np.array_equal(frozen[k], original[k]) for k in original)
    # B moved away from zero; the checkpoint holds the adapters and records its base
    assert max(float(np.abs(v).max()) for k, v in trained.items() if k.endswith("_lora_b")) > 0
    adapted, leaves, record = adapters.load_adapter(result.run_dir)
    assert adapted.lora.rank == 4 and set("/".join(p) for p in leaves) == set(trained)
    assert record["base"] == str(Path(start).absolute()) and record["base_digest"] == adapters.tree_digest(base)
    stored = {p.name for p in (result.run_dir / "checkpoints" / str(result.step) / "params").iterdir()}
    assert stored.isdisjoint({"embedding", "lm_head", "final_norm"})


def test_frozen_base_is_stored_quantized_and_sharded(tmp_path, start):
    config = lora_config(tmp_path, "plan", start, lora={"base_dtype": "int8", "train": ["norms"]})
    plan = plan_run(config, sft_stage(config, StageOptions(), log=quiet))
    frozen = plan.frozen.frozen_shapes
    gate = frozen["layers"]["mlp"]["gate"]
    assert isinstance(gate, QuantizedWeight) and gate.qvalue.dtype == jnp.int8
    assert gate.scale.shape == (2, 1, 160)  # one scale per layer and output column
    assert frozen["embedding"].dtype == jnp.float32  # not a matmul: kept in the compute dtype
    assert "attn_norm" in plan.param_shapes["layers"] and "attn_norm" not in frozen["layers"]
    from jax.sharding import PartitionSpec as P
    gate_sh = plan.frozen.frozen_sh["layers"]["mlp"]["gate"]  # sharded by the same rules as the weight
    assert gate_sh.qvalue.spec == P(None, "fsdp", "tensor") and gate_sh.scale.spec == P(None, None, "tensor")
    assert len(plan.abstract_args({"tokens": jax.ShapeDtypeStruct((1, 8, 96), jnp.int32)})) == 6


def assistant_loss(model_config, params, rows):
    logits = jax.jit(lambda p: forward(model_config, p, rows["tokens"], rows["positions"], rows["segment_ids"]))(params)
    nll = np.asarray(token_nll(logits, jnp.asarray(rows["targets"])))
    return float((nll * rows["loss_mask"]).sum() / rows["loss_mask"].sum())


def test_lora_sft_lowers_the_assistant_loss(sft_run, start):
    config, result, seen = sft_run
    examples, _ = encode_sft([ASSETS / "stages" / "sft_sample.jsonl"], Tokenizer.load(config.data.tokenizer),
                             get_chat_template("llama2-chat"), config.data.seq_len)
    rows = pack_examples(examples, config.data.seq_len)
    before = assistant_loss(config.base_model, load_params(start)[0], rows)
    after = assistant_loss(config.model, result.full_params, rows)
    print(f"\n  LoRA SFT (rank 4, 0.05 dropout): assistant-token loss on the whole sample {before:.3f} → "
          f"{after:.3f} after {len(seen)} steps; training loss {seen[0]['loss']:.3f} → {seen[-1]['loss']:.3f}")
    assert after < before - 0.5


def test_generate_runs_the_adapter_on_its_base(sft_run, start, capsys, tmp_path):
    _, result, _ = sft_run
    common = ["--prompt", "In the beginning", "--max-new-tokens", "4", "--temperature", "0", "--mesh", "none",
              "--tokenizer", str(ASSETS / "demo" / "tokenizer.model")]
    assert cli(["generate", "--checkpoint", str(start), "--adapter", str(result.run_dir), *common]) == 0
    with_adapter = capsys.readouterr().out
    assert cli(["generate", "--checkpoint", str(result.run_dir), *common]) == 0  # finds its recorded base
    assert capsys.readouterr().out == with_adapter
    # an adapter on another base is refused, by its recorded digest
    other = tmp_path / "other"
    cfg = get_preset("llama2-tiny", vocab_size=4096)
    save_params(other, jax.tree.map(np.asarray, init_params(cfg, jax.random.key(7))), cfg)
    assert cli(["generate", "--checkpoint", str(other), "--adapter", str(result.run_dir), *common]) == 2
    assert "trained on another base" in capsys.readouterr().err


@pytest.mark.parametrize("override,message", [
    ("lora.rank=0", "lora.rank must be a positive integer, got 0"),
    ("lora.targets=[q_prj]", "lora.targets: unknown target 'q_prj' (did you mean 'q_proj'?)"),
    ("lora.targets=[W_pack,q_proj]", "qkv (W_pack: one A shared by q, k and v) replaces q, k and v"),
    ("lora.base_dtype=int3", "lora.base_dtype must be one of"),
    ("lora.train=[embeddings]", "lora.train must be one of ('embedding', 'lm_head', 'norms'), got 'embeddings'"),
    ("lora.ranks=2", "unknown config key 'lora.ranks' (did you mean 'lora.rank'?)"),
])
def test_lora_section_errors_name_the_key(override, message, tmp_path, start):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override], base=lora_config(tmp_path, "x", start).to_dict())
    assert message in str(err.value)


def test_lora_runs_refuse_a_missing_base_and_a_mismatched_adapter(tmp_path, start, capsys):
    config = lora_config(tmp_path, "nobase", start, init_from=None)
    with pytest.raises(ConfigError, match="lora adapts a trained model: set init_from"):
        plan_run(config, sft_stage(config, StageOptions(), log=quiet))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(lora_config(tmp_path, "cli", start).to_yaml())
    # the CLI's lora.* overrides; an adapter of another rank is refused before anything trains
    peft_dir = tmp_path / "adapter"
    cfg = get_preset("llama2-tiny", vocab_size=4096)
    from jaxllm.config import LoraSpec
    from jaxllm.lora.model import split, trainable_mask
    full = init_params(cfg.replace(lora=LoraSpec(rank=2)), jax.random.key(0))
    save_params(peft_dir, jax.tree.map(np.asarray, split(full, trainable_mask(full))[0]), cfg.replace(lora=LoraSpec(rank=2)))
    adapters.write_record(peft_dir, base=str(start), base_digest=None)
    assert cli(["sft", str(recipe), f"lora.init_adapter={peft_dir}"]) == 2
    assert "is not the adapter this run trains (rank 2 vs 4" in capsys.readouterr().err


def test_lora_recipes_load():
    for name, family in (("llama2-7b-sft-lora", "llama"), ("baichuan2-7b-sft-lora", "baichuan2")):
        config, _ = load_stage_recipe(name)
        assert config.model.family == family and config.model.lora is not None and config.init_from
    baichuan = load_stage_recipe("baichuan2-7b-sft-lora")[0]
    assert baichuan.model.lora.targets == ("qkv",) and baichuan.model.lora.rank == 1  # Baichuan 2's fine-tune.py
    llama = load_stage_recipe("llama2-7b-sft-lora")[0]
    # the pre-flight on v5e-1: one row per micro-batch fits (11.1 GiB), four do not (16.7 of 15.75 GiB)
    assert llama.data.seq_len == 2048 and llama.train.batch_size // llama.train.grad_accum == 1
    assert llama.lora.base_dtype == "int8"


# ---- slow: kill-resume, another base, DPO and RM with LoRA -----------------------------------------------

@pytest.mark.slow
def test_killed_lora_run_resumes_bit_identically_and_refuses_another_base(tmp_path, start):
    """int8 base, dropout and gradient accumulation: the resumed run equals the uninterrupted one."""
    extra = {"lora": {"base_dtype": "int8"}, "train": {"steps": 12, "batch_size": 8, "grad_accum": 2}}
    config = lora_config(tmp_path, "straight", start, **{k: v for k, v in extra.items() if k != "lora"},
                         lora=extra["lora"])
    straight = train(config, sft_stage(config, StageOptions(), log=quiet), log=quiet)
    killed = lora_config(tmp_path, "killed", start, train=extra["train"], lora=extra["lora"])

    def crash(step, batch):
        if step == 8:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        train(killed, sft_stage(killed, StageOptions(), log=quiet), on_batch=crash, log=quiet)
    messages = []
    resumed = train(killed, sft_stage(killed, StageOptions(), log=quiet), log=messages.append)
    assert any("resumed" in m and "step 5" in m for m in messages)
    for x, y in zip(jax.tree.leaves(straight.params), jax.tree.leaves(resumed.params), strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    for x, y in zip(jax.tree.leaves(straight.opt_state), jax.tree.leaves(resumed.opt_state), strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    # the same run pointed at another base checkpoint (same architecture) is refused
    other = tmp_path / "other"
    cfg = get_preset("llama2-tiny", vocab_size=4096)
    save_params(other, jax.tree.map(np.asarray, init_params(cfg, jax.random.key(9))), cfg)
    moved = lora_config(tmp_path, "killed", other, train={**extra["train"], "steps": 14}, lora=extra["lora"])
    with pytest.raises(ConfigError, match="is not the base this run adapts"):
        train(moved, sft_stage(moved, StageOptions(), log=quiet), log=quiet)


@pytest.mark.slow
def test_lora_dpo_reference_is_the_base_and_rm_trains_its_head(tmp_path, start):
    config = lora_config(tmp_path, "dpo", start, sample="dpo_sample.jsonl", lora={"dropout": 0.0})
    config.optimizer.lr = 5e-3
    stage = dpo_stage(config, StageOptions(beta=0.5), log=quiet)
    seen = []
    result = train(config, stage, on_step=lambda s, m: seen.append(m), log=quiet)
    assert seen[0]["loss"] == pytest.approx(np.log(2), abs=1e-5)  # adapters start at B = 0: policy == base
    assert np.mean([m["reward_accuracy"] for m in seen[-3:]]) > 0.5
    # the reference log-probs (computed once, from the frozen base + initial adapters) are the base model's alone
    from jaxllm.stages.losses import sequence_logprobs
    from jaxllm.stages.stages import _flat
    base, _ = load_params(start)
    batch = next(stage.make_data(8, 0, 0, 1))
    b = _flat(batch)
    logits = forward(config.base_model, base, b["tokens"], b["positions"], b["segment_ids"])
    alone = np.asarray(sequence_logprobs(logits, b["targets"], b["loss_mask"])).reshape(-1, 2)
    np.testing.assert_allclose(batch["ref_logps"], alone, rtol=1e-5, atol=1e-4)
    assert result.frozen is not None
    rm = lora_config(tmp_path, "rm", start, sample="rm_sample.jsonl", steps=15, lora={"dropout": 0.0})
    rm_stage_, held = rm_stage(rm, StageOptions(eval_fraction=0.2), log=quiet)
    rm_seen = []
    rm_result = train(rm, rm_stage_, on_step=lambda s, m: rm_seen.append(m), log=quiet)
    trained = flat(rm_result.params)
    assert {"head/kernel", "head/bias"} <= set(trained)
    assert all(k.startswith("head/") or k.endswith(("_lora_a", "_lora_b")) for k in trained)
    assert np.mean([m["loss"] for m in rm_seen[-3:]]) < np.mean([m["loss"] for m in rm_seen[:3]])
