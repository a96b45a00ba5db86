"""Compile-only pre-flight: a run's real step, lowered and compiled for a topology's devices (a TPU slice
from a CPU host, N CPU devices, or this host's), without data, checkpoints or allocating anything.

The step is `plan_run`'s (the one `train` executes): only the devices differ. The report gives memory per
device from XLA's analysis of the compiled executable, whether it fits the chip's HBM, the compile time
and the collectives the step runs; when it does not fit, an override that would, checked by compiling it.

Memory of one program per device (`compiled.memory_analysis()`): its arguments (parameters, optimizer
state, the batch), its outputs, the part of the outputs that reuses donated argument buffers (alias), its
temporaries (one block, live for the whole execution) and its code. The chip must hold arguments +
outputs - alias + temporaries + code at once: that sum is the peak reported. A run with several programs
(PPO) holds its persistent state (every model and optimizer state) throughout; its peak is that state plus
the largest of what each program adds.
"""
from __future__ import annotations

import math
from typing import Callable

import jax

from jaxllm import sharding
from jaxllm.models.attention import choose
from jaxllm.preflight import topology as topologies
from jaxllm.config import ConfigError

from jaxllm.preflight.report import Report, compile_program, device_bytes, human


# ---------------------------------------------------------------------------------------------------------
# Training stages (pretrain, SFT, DPO, RM): plan_run's step.

def _abstract_batch(stage, config):
    """The step's batch: [accum, rows/accum, ...] shapes of the stage's rows."""
    rows, accum = config.train.batch_size, config.train.grad_accum
    if stage.batch_shapes is None:
        raise ConfigError(f"the {stage.name} stage does not describe its batch (Stage.batch_shapes)")
    return {k: jax.ShapeDtypeStruct((accum, rows // accum, *s.shape[1:]), s.dtype)
            for k, s in stage.batch_shapes(rows).items()}


# what `models.attention.choose` returns, as the report names it
ATTENTION_PATHS = {"reference": "einsum", "cudnn": "cuDNN flash", "xla": "XLA dot_product_attention"}


def _named(path: str, position: str) -> str:
    if path == "splash":
        return "fused: ALiBi flash kernel" if position == "alibi" else "fused: splash kernel"
    return ATTENTION_PATHS.get(path, path)


def preflight_train(config, make_stage: Callable, topology: topologies.Topology, *, suggest: bool = True,
                    log: Callable = print) -> Report:
    """Compile `make_stage(config)`'s train step (the one `train` runs) for `topology`; with `suggest`, a
    run that does not fit gets an override, checked by compiling it too."""
    from jaxllm.train.flops import flops_per_token
    from jaxllm.train.loop import plan_run

    config.validate()
    devices = topology.devices()
    stage = make_stage(config)
    plan = plan_run(config, stage, devices)
    args = plan.abstract_args(_abstract_batch(stage, config))
    state = {"parameters": device_bytes(args[0]), "optimizer state": device_bytes(args[1])}
    if plan.frozen is not None:  # LoRA: what trains above, the frozen (maybe quantized) base here
        state["frozen base"] = device_bytes(args[-1])
    log(f"compiling the {stage.name} step of {config.model.name} for {topology.describe()} ...")
    with jax.set_mesh(plan.mesh), sharding.axis_rules():
        program = compile_program(f"{stage.name} step", plan.step_fn, args, resident=sum(state.values()))
        m = config.model  # the path the step's attention took on these devices (`auto` resolved)
        path = choose(m.attention, m.position, m.dtype, True, config.data.seq_len, config.data.seq_len, m.head_dim)
    t = config.train
    seq_len = stage.tokens_per_row or config.data.seq_len
    rows = "pairs" if seq_len == 2 * config.data.seq_len else "rows"  # DPO and RM rows hold two sequences
    shards = math.prod(plan.mesh.shape[a] for a in ("data", "fsdp"))
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(plan.param_shapes))
    report = Report(
        title=f"{stage.name} {config.model.name} ({human(n_params)} parameters, remat {config.model.remat}, "
              f"attention {_named(path, m.position)})",
        topology=topology, devices=devices, mesh=plan.mesh, state=state, programs=[program],
        tokens=t.batch_size * seq_len,
        tokens_note=f"{t.batch_size} {rows} x {seq_len} tokens in {t.grad_accum} micro-batch(es) of "
                    f"{t.batch_size // t.grad_accum / shards:g} {rows} per device",
        flops_per_step=t.batch_size * seq_len * flops_per_token(config.model, config.data.seq_len))
    if suggest and not report.fits:
        _suggest_train(report, config, make_stage, log)
    return report


def larger_slice(topology: topologies.Topology, chips_needed: int) -> topologies.Topology | None:
    """The smallest slice of the same TPU generation (and slice count) larger than `topology` with at least
    `chips_needed` chips in all; None for CPU devices and past the largest slice."""
    if topology.platform != "tpu":
        return None
    chip = topology.chip
    sizes = sorted(topologies._GRIDS_2D) if chip.dims == 2 else [4, 8, 16, 32] + [64 * k for k in range(1, 129)]
    for chips in sizes:
        if chips * topology.slices >= chips_needed and chips > math.prod(topology.grid):
            return topologies.parse(f"{topology.generation}-{chips * chip.cores_per_chip}", topology.slices)
    return None


def _suggest_train(report: Report, config, make_stage, log) -> None:
    """Set report.suggestion to an override that should make the step fit (then compile it to check)."""
    from jaxllm.train.config import apply_overrides, from_dict

    hbm, budget = report.hbm, 0.92 * report.hbm
    program, params = report.programs[0], report.state["parameters"]
    devices = len(report.devices)
    overrides, topology = [], report.topology
    if report.state_bytes > 0.7 * hbm:  # the state alone: shard it over more chips
        if report.mesh.shape["data"] > topology.slices:  # data parallelism replicates it: use FSDP
            overrides = [f"mesh.data={topology.slices}", "mesh.fsdp=-1"]
        else:
            topology = larger_slice(topology, math.ceil(report.state_bytes * devices / (0.5 * hbm)))
    elif config.model.remat != "full":
        overrides = ["model.remat=full"]
    else:  # activations grow with the rows of a micro-batch: split the batch into more micro-batches
        t, shards = config.train, math.prod(report.mesh.shape[a] for a in ("data", "fsdp"))
        activations = max(program.temporaries - params, 1)
        # 0.6: temporaries shrink less than linearly with the rows (llama2-7b on v5p-32: 287 GiB at 64 rows
        # per chip, the compiler's figure, but 100 at 16 and 31 at 4)
        room = 0.6 * (budget - report.state_bytes - 2 * params - (program.arguments - program.resident))
        for accum in range(t.grad_accum + 1, t.batch_size + 1):
            if t.batch_size % accum or (t.batch_size // accum) % shards:
                continue
            if activations * t.grad_accum / accum <= room:
                overrides = [f"train.grad_accum={accum}"]
                break
        else:
            topology = larger_slice(topology, 2 * devices)
    if topology is None:
        return
    report.suggestion = " ".join(overrides) if overrides else f"--topology {topology.name}"
    log(f"does not fit; checking {report.suggestion} ...")
    try:
        changed = from_dict(apply_overrides(config.to_dict(), overrides)) if overrides else config
        check = preflight_train(changed, make_stage, topology, suggest=False, log=lambda *_: None)
    except ConfigError as err:
        report.suggestion_result = f"not checked: {err}"
        return
    report.suggestion_result = f"checked by compiling: {check.verdict()}"

