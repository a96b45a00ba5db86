"""Compile-only pre-flight (`--compile-only --topology`): the run's own step compiled for TPU slices with the
TPU compiler on this CPU host, for N CPU devices, and for one PPO iteration; fit, refusal, suggestion,
collectives, and the target-dependent layout of the model's matmuls."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import pickle
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import cli, models, sharding
from jaxllm.preflight import topology as topologies
from jaxllm.preflight.collectives import collectives

TINY = """run_dir: {tmp}/never
model: {{preset: llama2-tiny, remat: full}}
data:
  sources: [{{path: /nonexistent/corpus/*.jsonl.gz}}]   # never read: the pre-flight needs no data
  tokenizer: /nonexistent/tokenizer.model
  seq_len: 64
mesh: {{data: 1, fsdp: -1, tensor: 1}}
train: {{batch_size: 8, steps: 100}}
optimizer: {{warmup_steps: 10}}
"""


def run_cli(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(argv))
    return code, out.getvalue(), err.getvalue()


def tpu_devices(name):
    """Compile-only devices of a TPU topology, or a skip naming why the TPU compiler cannot load."""
    try:
        return topologies.parse(name).devices()
    except topologies.TopologyError as err:
        pytest.skip(f"the TPU compiler cannot load here: {err}")


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("preflight")
    path = tmp / "tiny.yaml"
    path.write_text(TINY.format(tmp=tmp))
    return str(path)


@pytest.fixture(scope="module")
def tpu_runs(recipe):
    """`jaxllm train --compile-only` of the tiny preset for a v5p and a v5e slice, once per module."""
    runs = {}
    for name in ("v5p:2x2x1", "v5e:2x2"):
        tpu_devices(name)
        saved = f"{recipe}.{name}.executable"
        runs[name] = (*run_cli("train", recipe, "--compile-only", "--topology", name, "--save-executable", saved),
                      saved)
    return runs


def memory_rows(out: str) -> dict[str, float]:
    return {m.group(1).strip(): float(m.group(2)) for m in re.finditer(r"^    ([a-z][a-z ()]+?)\s+([\d.]+)", out, re.M)}


@pytest.mark.parametrize("name,kind", [("v5p:2x2x1", "TPU v5"), ("v5e:2x2", "TPU v5 lite")])
def test_tiny_step_compiles_for_tpu_slices(tpu_runs, name, kind):
    code, out, err, saved = tpu_runs[name]
    assert code == 0, err
    assert f"4 x {kind}" in out and "mesh data=1 fsdp=4 tensor=1" in out
    assert "512 per step (8 rows x 64 tokens in 1 micro-batch(es) of 2 rows per device)" in out
    assert "attention einsum)" in out  # `auto` on TPU, but 64 tokens do not tile the fused kernels' blocks
    rows = memory_rows(out)  # MiB: v5e keeps this model's temporaries in on-chip VMEM, v5p in HBM
    assert rows["total (peak)"] > rows["parameters"] + rows["optimizer state"] > 0
    assert re.search(r"^  fits: [\d.]+ of (95.74|15.75) GiB, margin", out, re.M)
    # FSDP over 4 chips: the step gathers parameters and reduces gradients, inside the layer scan
    gathers = int(re.search(r"^    all-gather\s+(\d+) /", out, re.M).group(1))
    assert gathers >= 2 * 2  # at least once per layer (2) in the forward and again in the backward pass
    assert "/nonexistent" not in out + err
    with open(saved, "rb") as f:  # the TPU executable, serialized for loading on the slice
        stored = pickle.load(f)
    payload, in_tree, out_tree = stored["programs"]["pretrain step"]
    assert len(payload) > 10_000 and len(stored["device_ids"]) == 4 and stored["mesh"]["fsdp"] == 4
    assert "'tokens'" in str(in_tree) and "'grad_norm'" in str(out_tree)  # the train step's own trees


def test_topology_names():
    cases = {"v5p-128": ((4, 4, 4), 64), "v4-64": ((2, 4, 4), 32), "v5e-256": ((16, 16), 256),
             "v6e-8": ((2, 4), 8), "v5litepod-16": ((4, 4), 16), "v5p-1152": ((4, 12, 12), 576),
             "v5p-9216": ((12, 16, 24), 4608), "v5p:2x2x1": ((2, 2, 1), 4), "v5e-1": ((1, 1), 1)}
    for name, (grid, chips) in cases.items():
        t = topologies.parse(name)
        assert (t.platform, t.grid, t.chips) == ("tpu", grid, chips), name
    assert topologies.parse("v5p-8", slices=4).chips == 16
    assert topologies.parse("cpu-16").count == 16
    for bad, message in [("v5p-7", "counts TensorCores, two per chip"), ("v5e-12", "v5e slices have 1, 4, 8"),
                         ("v7x-8", "unknown TPU generation 'v7x'"), ("v5p:2x2", "a v5p chip grid has 3 sizes"),
                         ("gpu-8", "expected e.g. v5p-128"), ("v5p-96", "any multiple of 64")]:
        with pytest.raises(topologies.TopologyError, match=re.escape(message)):
            topologies.parse(bad)


def test_a_config_that_cannot_fit_exits_nonzero_with_a_checked_override(recipe):
    """One v5e chip (Colab's TPU: libtpu needs a 1x1x1 host for it) cannot hold 1.07B parameters with Adam:
    the compiler refuses the step, the report says by how much, and names a slice that fits, compiled to
    check."""
    tpu_devices("v5e-1")
    code, out, err = run_cli("train", recipe, "--compile-only", "--topology", "v5e-1", "model.vocab_size=8388608",
                             "data.seq_len=16")
    assert code == 1
    assert re.search(r"does NOT fit: needs at least [\d.]+ GiB, the chip has 15.75 GiB", out)
    assert "RESOURCE_EXHAUSTED" in out
    rows = memory_rows(out)
    assert rows["parameters"] == pytest.approx(4.0, abs=0.01)
    assert rows["optimizer state"] == pytest.approx(8.0, abs=0.01)
    assert re.search(r"to fit: --topology v5e-4 \(checked by compiling: fits: [\d.]+ of 15.75 GiB", out)
    assert err.strip().splitlines()[-1] == "jaxllm train: does not fit on v5e-1; try --topology v5e-4"


def test_cpu_devices_compile_the_step_that_runs(recipe):
    """cpu-2 needs no libtpu; the executable the pre-flight compiled computes exactly what the run's own
    jitted step computes on the same inputs (the same program: only the devices are chosen differently)."""
    from jaxllm.models import init_params
    from jaxllm.train.config import load_config
    from jaxllm.train.loop import plan_run
    from jaxllm.preflight.train import preflight_train
    from jaxllm.train.stage import pretraining_objective

    config = load_config(recipe)
    report = preflight_train(config, pretraining_objective, topologies.parse("cpu-2"), log=lambda *_: None)
    assert report.fits and dict(report.mesh.shape) == {"data": 1, "fsdp": 2, "tensor": 1}
    assert "2 x cpu" in report.table() and "attention einsum" in report.table()

    plan = plan_run(config, pretraining_objective(config), jax.devices("cpu")[:2])
    params = init_params(config.model, plan.init_key, plan.param_sh)
    opt_state = jax.jit(plan.optimizer.init, out_shardings=plan.opt_sh)(params)
    tokens = np.random.default_rng(0).integers(0, config.model.vocab_size, (8, 65)).astype(np.int32)
    batch = plan.put_batch({"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
                            "loss_mask": np.ones((8, 64), np.float32), "segment_ids": np.ones((8, 64), np.int32),
                            "positions": np.tile(np.arange(64, dtype=np.int32), (8, 1))})
    copy = lambda tree: jax.tree.map(jnp.copy, tree)  # both executables donate params and optimizer state
    with jax.set_mesh(plan.mesh), sharding.axis_rules():
        ours = report.programs[0].compiled(copy(params), copy(opt_state), batch, plan.train_key, jnp.int32(0))
        reference = plan.step_fn(params, opt_state, batch, plan.train_key, jnp.int32(0))
    assert np.isfinite(float(ours[2]["loss"])) and float(ours[2]["loss"]) == float(reference[2]["loss"])
    for a, b in zip(jax.tree.leaves(ours[0]), jax.tree.leaves(reference[0])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_dense_layout_follows_the_target_devices():
    """The decoder's projections are 2-D dots when compiling for CPU devices (XLA:CPU's faster form) and
    einsums over the model's axes for TPU devices, whatever backend this host runs."""
    from jaxllm.models import forward, get_preset, param_shapes

    config = get_preset("llama2-tiny")

    def dot_operands(devices):
        mesh = sharding.make_mesh(1, -1, 1, devices)
        params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                              param_shapes(config), models.param_shardings(config, mesh))
        tokens = jax.ShapeDtypeStruct((4, 16), jnp.int32, sharding=sharding.batch_sharding(mesh))
        with jax.set_mesh(mesh), sharding.axis_rules():
            text = jax.jit(lambda p, t: forward(config, p, t)).lower(params, tokens).as_text()
        return re.findall(r"stablehlo.dot_general .*: \(tensor<([\dx]+)x\w+>, tensor<([\dx]+)x\w+>\)", text)

    cpu, tpu = dot_operands(jax.devices("cpu")[:4]), dot_operands(tpu_devices("v5p:2x2x1"))
    two_d = lambda dots: sum(a.count("x") == 1 and b.count("x") == 1 for a, b in dots)
    assert len(cpu) == len(tpu) == 10  # q, k, v, o, gate, up, down, the head; attention's two einsums
    assert two_d(cpu) == 8 and two_d(tpu) == 0


def test_stage_batch_shapes_match_their_data(tmp_path):
    """Each stage says the layout of its batch without its data; it is the layout its data pipeline makes."""
    from jaxllm.stages.stages import dpo_stage, load_stage_recipe, objective, rm_stage, sft_stage
    from jaxllm.train.config import load_config
    from jaxllm.train.stage import pretraining_objective, pretraining_stage

    def layout(batch):
        return {k: (tuple(np.shape(v)), np.dtype(v.dtype)) for k, v in batch.items()}

    def expected(stage, rows):
        return {k: (s.shape, np.dtype(s.dtype)) for k, s in stage.batch_shapes(rows).items()}

    config = load_config("demo", ["data.shuffle_window=10"])
    data = pretraining_stage(config).make_data(4, 0, 0, 1)
    assert layout(next(data)) == expected(pretraining_objective(config), 4)
    data.close()
    for kind, make in (("sft", sft_stage), ("dpo", dpo_stage), ("rm", rm_stage)):
        config, options = load_stage_recipe(f"{kind}-demo", [f"init_from={tmp_path}"])
        stage = make(config, options, log=lambda *_: None)
        stage = stage[0] if isinstance(stage, tuple) else stage
        want = expected(objective(kind, config, options), 3)
        if kind == "dpo":  # the reference log-probs are added by `prepare`, from the starting checkpoint
            assert want.pop("ref_logps") == ((3, 2), np.dtype(np.float32))
        assert layout(next(stage.make_data(3, 0, 0, 1))) == want, kind


def ppo_recipe(tmp_path):
    recipe = tmp_path / "ppo.yaml"
    recipe.write_text(f"run_dir: {tmp_path}/never\npolicy: /nonexistent/policy\nreward_model: /nonexistent/rm\n"
                      "models: {policy: {preset: llama2-tiny}}\nmesh: {data: 1, fsdp: -1, tensor: 1}\n"
                      "ppo: {batch_size: 8, minibatch_size: 4, max_new_tokens: 8}\n")
    return recipe


def test_ppo_programs_and_state_without_checkpoints(tmp_path):
    """The PPO iteration's programs, built from the recipe's `models:` and abstract shapes (lowered, not
    compiled: the slow test compiles them), and the state a run keeps on the devices."""
    from jaxllm.rlhf.cli import load_recipe
    from jaxllm.rlhf.programs import iteration_programs
    from jaxllm.preflight.ppo import recipe_models
    from jaxllm.preflight.report import device_bytes

    recipe = load_recipe("ppo", str(ppo_recipe(tmp_path)))
    policy, reward_models = recipe_models(recipe)
    assert policy.name == reward_models[0].name == "llama2-tiny" and len(reward_models) == 1
    mesh = sharding.make_mesh(1, -1, 1, jax.devices("cpu")[:2])
    state, programs = iteration_programs(policy, reward_models, recipe.ppo, mesh, prompt_len=8)
    assert [(p[0], p[4]) for p in programs] == [("gather for generation", 1), ("prefill", 1), ("decode", 1),
                                                ("scoring (reward model)", 1), ("rollout stats", 1),
                                                ("advantages", 1), ("update", 2)]
    sizes = {k: device_bytes(v) for k, v in state.items()}
    assert sizes["policy (trained)"] == sizes["reference policy"] > sizes["reward model"] > 0  # no LM head
    moments = 2 * (sizes["policy (trained)"] + sizes["value model (trained)"])  # Adam's, plus step counts
    assert moments <= sizes["optimizer state"] < moments + 1024
    with jax.set_mesh(mesh), sharding.axis_rules():
        for name, fn, args, kwargs, *_ in programs:
            if not callable(args):  # decode's inputs are prefill's compiled outputs
                assert fn.lower(*args, **kwargs).as_text(), name
    # rollouts sampled in two parts: prefill and decode run twice per iteration, on half the rows
    _, parts = iteration_programs(policy, reward_models, dataclasses.replace(recipe.ppo, generation_chunks=2), mesh,
                                  prompt_len=8)
    parts = {p[0]: p for p in parts}
    assert parts["prefill"][4] == parts["decode"][4] == 2 and parts["update"][4] == 2
    assert parts["prefill"][2][1].shape[0] == 4 and parts["rollout stats"][2][3]["tokens"].shape[0] == 8
    # without the checkpoints and without `models:`, the error says what to add
    path = ppo_recipe(tmp_path)
    path.write_text(path.read_text().replace("models: {policy: {preset: llama2-tiny}}\n", ""))
    code, _, err = run_cli("ppo", str(path), "--compile-only", "--topology", "cpu-1")
    assert code == 2 and "is not on this machine: to compile without it, give its architecture" in err


@pytest.mark.slow
def test_ppo_iteration_compiles_without_checkpoints(tmp_path):
    recipe = ppo_recipe(tmp_path)  # Llama 2's two reward models: each is state, each scores the rollouts
    recipe.write_text(recipe.read_text().replace("reward_model: /nonexistent/rm\n", "reward_model: /nonexistent/rm\n"
                                                 "safety_reward_model: /nonexistent/safety\n"))
    code, out, err = run_cli("ppo", str(recipe), "--compile-only", "--topology", "cpu-1", "--prompt-tokens", "8")
    assert code == 0, err
    assert "128 per iteration (8 rollouts of up to 8 prompt + 8 new tokens" in out
    for name, runs in (("gather for generation", 1), ("prefill", 1), ("decode", 1),
                       ("scoring (helpfulness reward model)", 1), ("scoring (safety reward model)", 1),
                       ("rollout stats", 1), ("advantages", 1), ("update", 2)):
        assert re.search(rf"^  {re.escape(name)}\s+{runs}\s", out, re.M), name
    rows = memory_rows(out)
    assert rows["policy (trained)"] == rows["reference policy"] > 0 and rows["optimizer state"] > 0
    assert rows["helpfulness reward model"] == rows["safety reward model"] > 0
    assert "unknown trip count" not in out  # decode's token loop is counted max_new_tokens - 1 times
    assert not (tmp_path / "never").exists()


@pytest.mark.slow
def test_a_ppo_iteration_whose_prefill_does_not_fit_is_told_to_sample_in_parts(tmp_path):
    """32 rollouts of 4,088 prompt tokens on one v5e chip: only the prefill (all rollouts' attention at
    once) is over its 15.75 GiB; the suggestion is to sample them in two parts, checked by compiling."""
    tpu_devices("v5e-1")
    recipe = ppo_recipe(tmp_path)
    recipe.write_text(recipe.read_text()
                      .replace("{preset: llama2-tiny}", "{preset: llama2-tiny, max_position_embeddings: 4096}")
                      .replace("{batch_size: 8, minibatch_size: 4,", "{batch_size: 32, minibatch_size: 2,"))
    code, out, err = run_cli("ppo", str(recipe), "--compile-only", "--topology", "v5e-1")
    assert code == 1
    assert "the TPU compiler refused prefill" in out and "refused scoring" not in out
    assert re.search(r"to fit: ppo.generation_chunks=2 \(checked by compiling: fits: [\d.]+ of 15.75 GiB", out)
    assert err.strip().splitlines()[-1] == "jaxllm ppo: does not fit on v5e-1; try ppo.generation_chunks=2"


def test_bad_input_is_one_line(recipe, monkeypatch, capsys):
    for argv, message in [
            (["train", recipe, "--topology", "v5p-8"], "--topology needs --compile-only"),
            (["train", recipe, "--compile-only", "--topology", "v5p-7"], "counts TensorCores, two per chip"),
            (["train", recipe, "--compile-only", "--topology-slices", "2"], "--topology-slices needs --topology")]:
        with pytest.raises(SystemExit) as exit_:
            cli.main(argv)
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    monkeypatch.setattr(topologies, "libtpu_available", lambda: False)
    code, _, err = run_cli("train", recipe, "--compile-only", "--topology", "v5p-128")
    assert code == 2
    assert err.strip() == ("jaxllm train: error: topology v5p-128 needs the TPU compiler (libtpu), which is not "
                           f"installed: {topologies.INSTALL_HINT}")
    code, _, err = run_cli("train", recipe, "--compile-only", "--topology", "cpu-4", "train.batch_size=6")
    assert code == 2 and "not divisible by mesh data×fsdp=4" in err


def test_multislice_mesh_puts_data_parallelism_across_slices():
    tpu_devices("v5p:2x2x1")
    devices = topologies.parse("v5p-8", slices=2).devices()
    mesh = sharding.make_mesh(2, -1, 1, devices)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    for i in range(2):  # each data index is one slice; fsdp stays on the slice's fast links
        assert {d.slice_index for d in mesh.devices[i].flat} == {i}
    with pytest.raises(ValueError, match=re.escape("mesh: data=1 must be a multiple of the 2 slices")):
        sharding.make_mesh(1, -1, 1, devices)


def test_collectives_count_loop_iterations():
    """A collective in a loop body counts once per iteration, nested loops multiply, bytes are per device."""
    hlo = """HloModule m, entry_computation_layout={()->f32[]}

%cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(5)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%inner (x: f32[2]) -> f32[8] {
  %x = f32[2]{0} parameter(0)
  ROOT %ag = f32[8]{0} all-gather(%x), channel_id=1, replica_groups={{0,1,2,3}}, dimensions={0}
}

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %v = f32[8]{0} get-tuple-element(%p), index=1
  %s = f32[2]{0} slice(%v), slice={[0:2]}
  %g = f32[8]{0} fusion(%s), kind=kLoop, calls=%inner
  %r = f32[8]{0} all-reduce(%g), channel_id=2, replica_groups={{0,1,2,3}}, to_apply=%add
  ROOT %t = (s32[], f32[8]{0}) tuple(%i, %r)
}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %c = f32[] add(%a, %b)
}

ENTRY %main () -> f32[] {
  %z = f32[8]{0} constant({0,0,0,0,0,0,0,0})
  %zero = s32[] constant(0)
  %init = (s32[], f32[8]{0}) tuple(%zero, %z)
  %w = (s32[], f32[8]{0}) while(%init), condition=%cond, body=%body
  %out = f32[8]{0} get-tuple-element(%w), index=1
  %rs = f32[2]{0} reduce-scatter(%out), channel_id=3, replica_groups={{0,1,2,3}}, dimensions={0}, to_apply=%add
  ROOT %sum = f32[] reduce(%rs, %zero), dimensions={0}, to_apply=%add
}
"""
    stats = collectives(hlo).by_kind
    assert (stats["all-gather"].count, stats["all-gather"].bytes) == (5, 5 * 32)
    assert (stats["all-reduce"].count, stats["all-reduce"].bytes) == (5, 5 * 32)
    assert (stats["reduce-scatter"].count, stats["reduce-scatter"].bytes) == (1, 32)  # its full input


def test_libtpu_without_a_tpu_starts_jax_on_the_cpu(monkeypatch):
    monkeypatch.setattr(topologies, "libtpu_available", lambda: True)
    monkeypatch.setattr(topologies, "tpu_hardware_present", lambda: False)
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    topologies.hide_absent_tpu()
    import os
    assert os.environ["JAX_PLATFORMS"] == "cpu"
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    topologies.hide_absent_tpu()
    assert os.environ["JAX_PLATFORMS"] == "cuda,cpu"  # the user's choice stands
