"""The one train loop: mesh, shardings, jit, optimizer, accumulation, NaN skipping, checkpoints, resume,
metrics, progress and the loss plot. Stages differ only by the `Stage` (loss + data) they pass in.

Order of a step: next batch → (its data state is what a checkpoint at this step records) → jitted update
→ the previous step's metrics are fetched while this one runs (host and device overlap) → checkpoint.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxllm import checkpoint as jckpt
from jaxllm import sharding
from jaxllm import storage
from jaxllm.config import ConfigError
from jaxllm.models import init_params as model_init_params
from jaxllm.models import param_logical_axes, param_shapes
from jaxllm.train import flops, rundir
from jaxllm.train.split import FrozenPart, StartingModel, merge
from jaxllm.train.engine import Run, maybe_initialize_distributed, mesh_context
from jaxllm.train.config import RunConfig, parse_window, resolve_epochs
from jaxllm.train.metrics import Reporter, last_logged, plot_loss
from jaxllm.train.optim import make_optimizer
from jaxllm.train.stage import Stage, pretraining_stage
from jaxllm.train.step import make_train_step

@dataclasses.dataclass
class TrainResult:
    step: int
    params: Any
    opt_state: Any
    stop_reason: str          # done | signal SIGTERM/SIGINT | non-finite loss | data exhausted
    exit_code: int
    nan_skipped: int
    run_dir: Path
    last_metrics: dict
    frozen: Any = None        # the frozen tree of a split run (params are what trained)

    @property
    def full_params(self):
        """The parameters the model runs with: a split run's trained leaves merged into its frozen tree."""
        return self.params if self.frozen is None else merge(self.params, self.frozen)


def _batch_putter(mesh, accum: int, global_rows: int):
    """numpy [local_rows, ...] → global jax.Array [accum, global_rows/accum, ...], rows over (data, fsdp)."""
    lead = sharding.batch_sharding(mesh, ndim=1).spec[0]
    spec = NamedSharding(mesh, P(None, lead))
    hosts = jax.process_count()

    def put(local: dict) -> dict:
        out = {}
        for key, value in local.items():
            value = np.asarray(value)
            micro = value.reshape(accum, value.shape[0] // accum, *value.shape[1:])
            shape = (accum, global_rows // accum, *value.shape[1:])
            out[key] = jax.make_array_from_process_local_data(spec, micro, shape) if hosts > 1 \
                else jax.device_put(micro, spec)
        return out

    return put, spec


def _check_batch_layout(config: RunConfig, mesh) -> int:
    """Rows this host loads per step; errors name the sizes that do not divide."""
    t = config.train
    hosts = jax.process_count()
    if t.batch_size % hosts:
        raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by the {hosts} hosts")
    shards = math.prod(mesh.shape[a] for a in ("data", "fsdp"))
    micro = t.batch_size // t.grad_accum
    if micro % shards:
        raise ConfigError(f"train.batch_size/grad_accum={micro} rows per micro-batch are not divisible by "
                          f"mesh data×fsdp={shards}")
    if (t.batch_size // hosts) % t.grad_accum:
        raise ConfigError(f"train.grad_accum={t.grad_accum} does not divide the {t.batch_size // hosts} rows "
                          f"per host")
    return t.batch_size // hosts


def _any_host(flag: bool) -> bool:
    """True when `flag` holds on any host: hosts whose data runs out at different steps stop together
    instead of leaving the others waiting in a collective."""
    from jax.experimental import multihost_utils
    return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _abstract(shapes, shardings):
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def _initial_params(config: RunConfig, stage: Stage, init_key, param_sh):
    """Parameters of a new run: the stage's own loader or initialiser (a stage with one owns `init_from`),
    the model's parameters from `init_from`, or the model's random initialisation."""
    if stage.load_params is not None:
        return stage.load_params(init_key, param_sh)
    if stage.init_params is not None:
        return jax.jit(stage.init_params, out_shardings=param_sh)(init_key)
    if config.init_from:
        params, _ = jckpt.load_params(config.init_from, config.model, shardings=param_sh,
                                      dtype=config.model.param_dtype)
        return params
    return model_init_params(config.model, init_key, param_sh)


@dataclasses.dataclass
class RunPlan:
    """Everything a run compiles, and where: the mesh, the shardings of parameters, optimizer state and
    batches, and the jitted train step. `train` executes it; a compile-only pre-flight lowers the same step
    for another set of devices (only `devices` differ, so what is checked is what runs)."""
    mesh: Any
    param_axes: Any           # pytree of logical PartitionSpecs
    param_shapes: Any         # pytree of ShapeDtypeStruct
    param_sh: Any             # pytree of NamedSharding
    optimizer: optax.GradientTransformation
    schedule: Callable
    opt_shapes: Any
    opt_sh: Any
    put_batch: Callable       # this host's numpy rows -> global [accum, rows/accum, ...] arrays
    batch_sh: NamedSharding
    step_fn: Callable         # jitted (params, opt_state, batch, rng, step) -> (params, opt_state, metrics)
    local_rows: int           # rows this host loads per step
    init_key: jax.Array
    train_key: jax.Array
    frozen: FrozenPart | None = None  # a split run: params are what trains; step_fn takes the frozen tree last

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def abstract_params(self):
        return _abstract(self.param_shapes, self.param_sh)

    def abstract_opt_state(self):
        return _abstract(self.opt_shapes, self.opt_sh)

    def abstract_args(self, batch_shapes) -> tuple:
        """The step's arguments as sharded shapes, for `step_fn.lower(*args)`: params, optimizer state,
        batch ([accum, rows, ...] ShapeDtypeStructs), rng, step, and a split run's frozen tree."""
        batch = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.batch_sh), batch_shapes)
        args = (self.abstract_params(), self.abstract_opt_state(), batch,
                jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=self.replicated),
                jax.ShapeDtypeStruct((), np.int32, sharding=self.replicated))
        return args + ((self.frozen.abstract_frozen(),) if self.frozen is not None else ())


def plan_run(config: RunConfig, stage: Stage, devices=None) -> RunPlan:
    """The mesh over `devices` (default: all), shardings by the logical-axis rules (optimizer moments like
    their parameters, the rest replicated) and the jitted step, for `config.train.steps` steps. Allocates
    nothing: shapes come from `jax.eval_shape`."""
    model_config, total, accum = config.model, config.train.steps, config.train.grad_accum
    try:
        mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    local_rows = _check_batch_layout(config, mesh)
    replicated = NamedSharding(mesh, P())
    init_key, train_key = jax.random.split(jax.random.key(config.seed))
    if stage.init_params is not None:
        param_axes, shapes = stage.param_axes, jax.eval_shape(stage.init_params, init_key)
    else:
        param_axes, shapes = param_logical_axes(model_config), param_shapes(model_config)
    frozen_part, split = None, config.frozen_split()
    if split is not None:  # only part of the parameters trains (e.g. adapters and new heads); the rest is frozen
        param_axes, shapes, frozen_part = split(config, stage.lm_path, param_axes, shapes, mesh)
    param_sh = sharding.tree_shardings(param_axes, shapes, mesh)
    optimizer, schedule = make_optimizer(config.optimizer, total, param_axes)
    opt_shapes = jax.eval_shape(optimizer.init, _abstract(shapes, param_sh))
    opt_sh = optax.tree_map_params(optimizer, lambda _, sh: sh, opt_shapes, param_sh,
                                   transform_non_params=lambda _: replicated)
    put_batch, batch_sh = _batch_putter(mesh, accum, config.train.batch_size)
    in_sh = (param_sh, opt_sh, batch_sh, replicated, replicated)
    if frozen_part is not None:  # the frozen tree: an argument (never a constant), not donated
        in_sh += (frozen_part.frozen_sh,)
    step_fn = jax.jit(make_train_step(stage.loss_fn, optimizer, schedule), in_shardings=in_sh,
                      out_shardings=(param_sh, opt_sh, replicated), donate_argnums=(0, 1))
    return RunPlan(mesh=mesh, param_axes=param_axes, param_shapes=shapes, param_sh=param_sh, optimizer=optimizer,
                   schedule=schedule, opt_shapes=opt_shapes, opt_sh=opt_sh, put_batch=put_batch, batch_sh=batch_sh,
                   step_fn=step_fn, local_rows=local_rows, init_key=init_key, train_key=train_key,
                   frozen=frozen_part)


def train(config: RunConfig, stage: Stage | None = None, *, devices=None, on_batch: Callable | None = None,
          on_step: Callable | None = None, log: Callable = print) -> TrainResult:
    """Train `stage` (default: pretraining on `config.data`) for `config.train.steps` optimizer steps in
    `config.run_dir`, resuming from its latest good checkpoint.

    on_batch(step, local_batch): called with each host batch (numpy) before its update (tests, debugging).
    on_step(step, metrics): called with each step's fetched metrics (floats).
    devices: the devices of the mesh (default: all).
    """
    maybe_initialize_distributed(config.distributed)
    config.validate()
    stage = stage or pretraining_stage(config)
    resolve_epochs(config, stage.num_rows)
    model_config, total, accum = config.model, config.train.steps, config.train.grad_accum
    plan = plan_run(config, stage, devices)
    mesh, train_key = plan.mesh, plan.train_key
    config.stage_name = stage.name
    rundir.check(config.run_dir, config)
    if config.init_from and (stage.prepare is not None or not rundir.has_checkpoints(config.run_dir)):
        # a new run starts from it (a stage that prepares reads it too; a split run: its frozen tree)
        rundir.check_init_from(config.init_from, config.base_model)
    primary = jax.process_index() == 0

    frozen = initial = None
    if plan.frozen is not None:
        frozen, initial = plan.frozen.start(config, plan, stage.init_params, log)
    if stage.prepare is not None:  # the stage reads the model the run starts from, as a frozen tree
        stage.prepare(mesh, StartingModel(frozen, initial,
                                          load=lambda: _initial_params(config, stage, plan.init_key, plan.param_sh)))
    with contextlib.ExitStack() as cleanup:
        data = stage.make_data(plan.local_rows, config.seed, jax.process_index(), jax.process_count())
        if hasattr(data, "close"):
            cleanup.callback(data.close)
        # Only a run whose inputs all checked out (its first data block read) creates, locks and writes its
        # directory; the lock is released last, after the final save is committed.
        run_lock = rundir.claim(config.run_dir, config, log=log)
        cleanup.callback(run_lock.release)
        run_dir = storage.path(config.run_dir)  # gs://… stays a bucket path
        if stage.tokenizer_path:
            rundir.copy_tokenizer(run_dir, stage.tokenizer_path)
        rundir.copy_model_files(run_dir, stage.tokenizer_path, config.init_from)
        run = cleanup.enter_context(Run(run_dir, model_config, keep=config.checkpoint.keep,
                                        async_save=config.checkpoint.async_save, lock=run_lock,
                                        tensorboard=config.log.tensorboard, log=log,
                                        profile=parse_window(config.train.profile)))
        ckpts = run.checkpoints
        if plan.frozen is not None:
            plan.frozen.record(ckpts.directory, config, resuming=bool(ckpts.steps()))
        restored = ckpts.restore_latest(plan.abstract_params(), plan.abstract_opt_state(), data, log=log)
        if restored is not None:
            step, params, opt_state, meta = restored
            log(f"resumed {run_dir} at step {step}")
        else:
            step, meta = 0, {}
            params = initial if initial is not None else _initial_params(config, stage, plan.init_key, plan.param_sh)
            if config.init_from and (stage.load_params is not None or stage.init_params is None):
                log(f"initialised from {config.init_from}")
            opt_state = jax.jit(plan.optimizer.init, out_shardings=plan.opt_sh)(params)

        seq_len = stage.tokens_per_row or config.data.seq_len
        tokens_per_step = config.train.batch_size * seq_len
        device = mesh.devices.flat[0]
        if primary:
            n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(plan.param_shapes))
            log(f"{stage.name} {model_config.name} ({n_params / 1e6:.1f}M parameters, {model_config.dtype} "
                f"compute) on {mesh.devices.size} {device.platform} device(s), mesh data={mesh.shape['data']} "
                f"fsdp={mesh.shape['fsdp']} tensor={mesh.shape['tensor']}; {tokens_per_step} tokens/step in "
                f"{accum} micro-batch(es); steps {step} → {total}; run dir {run_dir}")
            if plan.frozen is not None:
                log(plan.frozen.describe(plan))
        metrics_log = run.open_metrics(step)
        report = Reporter(metrics_log, every=config.log.every, total=total, start_step=step,
                          tokens_per_step=tokens_per_step, flops_per_token=flops.flops_per_token(model_config, seq_len),
                          num_devices=mesh.devices.size, peak_flops=flops.peak_flops(device.device_kind,
                                                                                     config.log.peak_tflops),
                          nan_skipped=int(meta.get("nan_skipped", 0)), progress=config.log.progress and primary,
                          desc=stage.name, on_step=on_step, data_stats=getattr(data, "stats", None))
        cleanup.callback(report.close)

        def save(at: int, data_state) -> int:
            meta = {"step": at, "seed": config.seed, "nan_skipped": report.nan_skipped,
                    "hosts": jax.process_count(), "tokens": at * tokens_per_step, "stage": stage.name,
                    "rng": np.asarray(jax.random.key_data(train_key)).tolist()}
            ckpts.save(at, params, opt_state, meta, data_state)
            return at

        stop_reason, exit_code = "done", 0
        saved_step = step if restored is not None else -1
        pending = None  # the last step's metrics, fetched while the next step runs
        data_state = data.get_state() if step < total else None
        # Finite data on several hosts: agree every step on whether it ran out (a host sync, so only then).
        can_run_out = jax.process_count() > 1 and getattr(data, "finite", True)
        with mesh_context(mesh):
            run.at_step(step)
            while step < total:
                local = next(data, None)
                if (_any_host(local is None) if can_run_out else local is None):
                    stop_reason = "data exhausted"
                    break
                data_state = data.get_state()  # what a checkpoint after this step records
                if on_batch is not None:
                    on_batch(step + 1, local)
                params, opt_state, metrics = plan.step_fn(params, opt_state, plan.put_batch(local),
                                                          jax.random.fold_in(train_key, step), step,
                                                          *(() if frozen is None else (frozen,)))
                step += 1
                if pending is not None:
                    report(pending[0], jax.device_get(pending[1]))
                pending = (step, metrics)
                run.at_step(step, metrics)
                signalled = run.should_stop(step)
                too_many_nans = report.nan_streak >= config.train.max_nan_streak
                stopping = signalled or too_many_nans
                if step % config.checkpoint.every == 0 or step == total or stopping:
                    report(step, jax.device_get(metrics))  # the checkpoint's counters include this step
                    pending = None
                    saved_step = save(step, data_state)
                    too_many_nans = report.nan_streak >= config.train.max_nan_streak
                if signalled:
                    stop_reason, exit_code = run.exit_code()
                    break
                if too_many_nans:
                    stop_reason, exit_code = "non-finite loss", 1
                    break
            if pending is not None:
                report(pending[0], jax.device_get(pending[1]))
            report.flush(step)  # a run stopped between log steps still logs its last step
            if step > saved_step and step > 0:
                saved_step = save(step, data_state)
        png = None
        if primary and config.log.plot:
            png = plot_loss(metrics_log.path, run_dir / "loss.png",
                            title=f"{stage.name} {model_config.name}: {run_dir}")

    if stop_reason == "non-finite loss":
        log(f"stopped: {config.train.max_nan_streak} consecutive steps with a non-finite loss or gradient; "
            f"parameters are those of the last finite step, saved at step {step}")
    last = report.last
    if primary:
        last = last_logged(metrics_log.path) or last  # the summary shows what metrics.jsonl ends with
        summary = ", ".join(f"{k} {_fmt(last[k])}" for k in ("loss", "z_loss", "grad_norm", "tokens_per_s", "mfu")
                            if k in last)
        log(f"{stop_reason} at step {step}/{total}" + (f": {summary}" if summary else "")
            + (f"; {report.nan_skipped} non-finite steps skipped" if report.nan_skipped else ""))
        log(f"  checkpoint   {run_dir / 'checkpoints'} (steps {ckpts.steps()})")
        log(f"  tensorboard  {metrics_log.tb_dir}" if config.log.tensorboard else "  tensorboard  off")
        log(f"  metrics      {metrics_log.path}")
        log(f"  loss curve   {png}" if png else "  loss curve   (none)")
    return TrainResult(step=step, params=params, opt_state=opt_state, stop_reason=stop_reason,
                       exit_code=exit_code, nan_skipped=report.nan_skipped, run_dir=run_dir, last_metrics=last,
                       frozen=frozen)
