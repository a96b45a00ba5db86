"""A compiled program's report: memory per chip against the chip's HBM, the collectives per step, compile
time; the table the pre-flight prints and the serialized executables."""
from __future__ import annotations

import dataclasses
import math
import pickle
import re
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jaxllm.preflight import topology as topologies
from jaxllm.config import ConfigError
from jaxllm.preflight.collectives import KINDS, CollectiveStats, collectives


GIB = 2**30
# The TPU compiler's out-of-memory messages; the first figure is what the program needs, inputs included.
_REFUSED = re.compile(r"HLO temporaries \(([\d.]+)([KMGT]?)\) exceeds|Used ([\d.]+)([KMGT]?) of [\d.]+[KMGT]? hbm")
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def device_bytes(tree) -> int:
    """Bytes one device holds of a pytree of ShapeDtypeStructs / arrays with shardings (its shards)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) is not None else leaf.shape
        # int4 packs two to a byte, as devices store it; PRNG key dtypes have an itemsize too
        bits = jax.dtypes.itemsize_bits(leaf.dtype) if jnp.issubdtype(leaf.dtype, jnp.integer) else \
            8 * leaf.dtype.itemsize
        total += math.prod(shape) * bits // 8
    return total


@dataclasses.dataclass
class Program:
    """One compiled program: what it adds to the persistent state, its compile time and collectives."""
    name: str
    calls: int                        # executions per step (PPO: per iteration)
    resident: int                     # bytes of its arguments that are the run's persistent state
    arguments: int = 0
    outputs: int = 0
    alias: int = 0
    temporaries: int = 0
    code: int = 0
    lower_s: float = 0.0
    compile_s: float = 0.0
    collectives: CollectiveStats | None = None
    refused: str | None = None        # the compiler's out-of-memory message
    compiled: Any = None

    @property
    def transient(self) -> int:
        """Bytes per device beyond the persistent state while it runs."""
        return self.arguments - self.resident + self.outputs - self.alias + self.temporaries + self.code


def compile_program(name: str, fn, args, kwargs=None, *, resident: int, calls: int = 1,
                    loop_trips: int | None = None) -> Program:
    """Lower `fn` (a jitted function) for abstract `args` and compile it; an executable the TPU compiler
    refuses for lack of HBM is reported (its footprint from the message), not raised. `loop_trips`: the
    iterations of a loop whose bound is an argument (decode's token loop)."""
    program = Program(name, calls, resident, arguments=device_bytes(args))
    began = time.perf_counter()
    lowered = fn.lower(*args, **(kwargs or {}))
    program.lower_s = time.perf_counter() - began
    began = time.perf_counter()
    try:
        with warnings.catch_warnings():  # a compile-only client cannot load its own persistent-cache entries
            warnings.filterwarnings("ignore", message="Error reading persistent compilation cache entry")
            compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as err:
        if "RESOURCE_EXHAUSTED" not in str(err):
            raise
        program.compile_s = time.perf_counter() - began
        program.refused = str(err).strip().splitlines()[0]
        match = _REFUSED.search(program.refused)
        if match:
            size, unit = match.group(1, 2) if match.group(1) else match.group(3, 4)
            program.temporaries = max(int(float(size) * _UNITS[unit]) - program.arguments, 0)
        return program
    program.compile_s = time.perf_counter() - began
    memory = compiled.memory_analysis()
    program.arguments = memory.argument_size_in_bytes
    program.outputs, program.alias = memory.output_size_in_bytes, memory.alias_size_in_bytes
    program.temporaries, program.code = memory.temp_size_in_bytes, memory.generated_code_size_in_bytes
    program.collectives = collectives(compiled.as_text(), loop_trips)
    program.compiled = compiled
    return program


@dataclasses.dataclass
class Report:
    """The pre-flight of one run on one topology."""
    title: str                        # e.g. "pretrain llama2-7b (6.74B parameters)"
    topology: topologies.Topology
    devices: list
    mesh: Any
    state: dict                       # persistent bytes per device by what they are
    programs: list
    tokens: int                       # tokens per step (PPO: per iteration)
    tokens_note: str = ""
    flops_per_step: float | None = None
    suggestion: str | None = None     # an override that makes it fit
    suggestion_result: str | None = None
    notes: list = dataclasses.field(default_factory=list)

    @property
    def hbm(self) -> int:
        return topologies.device_memory_bytes(self.devices[0], len(self.devices))

    @property
    def state_bytes(self) -> int:
        return sum(self.state.values())

    @property
    def peak(self) -> int:
        return self.state_bytes + max((p.transient for p in self.programs), default=0)

    @property
    def refused(self) -> bool:
        return any(p.refused for p in self.programs)

    @property
    def fits(self) -> bool:
        return not self.refused and self.peak <= self.hbm

    @property
    def compile_s(self) -> float:
        return sum(p.lower_s + p.compile_s for p in self.programs)

    def verdict(self) -> str:
        hbm, peak = self.hbm / GIB, self.peak / GIB
        if self.fits:
            return f"fits: {peak:.2f} of {hbm:.2f} GiB, margin {hbm - peak:.2f} GiB ({1 - peak / hbm:.0%})"
        need = "at least " if self.refused else ""
        return f"does NOT fit: needs {need}{peak:.2f} GiB, the chip has {hbm:.2f} GiB (over by {peak - hbm:.2f})"

    def table(self) -> str:
        return format_report(self)


def human(count: float) -> str:
    return f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.1f}M"


def format_report(report: Report) -> str:
    """The pre-flight table: memory per device vs HBM, fit and margin, tokens, compile time, collectives."""
    device = report.devices[0]
    # GiB for real models; MiB keeps a tiny test model's figures readable
    unit, name = (GIB, "GiB") if report.peak >= GIB else (2**20, "MiB")
    mesh = " ".join(f"{k}={v}" for k, v in report.mesh.shape.items())
    lines = [f"pre-flight: {report.title}",
             f"  target   {report.topology.describe()}; {len(report.devices)} x {device.device_kind}, "
             f"{len({d.process_index for d in report.devices})} host(s); mesh {mesh}",
             f"  tokens   {report.tokens:,} per {'iteration' if len(report.programs) > 1 else 'step'}"
             + (f" ({report.tokens_note})" if report.tokens_note else ""), "",
             f"  {'memory per device':<34}{name:>9}"]
    for what, size in report.state.items():
        lines.append(f"    {what:<32}{size / unit:>9.2f}")
    widest = max(report.programs, key=lambda p: p.transient)
    if len(report.programs) == 1:
        p = widest
        lines += [f"    {'batch and step inputs':<32}{(p.arguments - p.resident) / unit:>9.2f}",
                  f"    {'temporaries':<32}{p.temporaries / unit:>9.2f}"
                  + ("  (the compiler's figure less the inputs)" if p.refused else ""),
                  f"    {'outputs not donated':<32}{(p.outputs - p.alias) / unit:>9.2f}",
                  f"    {'program code':<32}{p.code / unit:>9.2f}"]
    else:
        lines.append(f"    {'largest program: ' + widest.name:<32}{widest.transient / unit:>9.2f}  (its inputs, "
                     f"outputs, temporaries and code beyond the state)")
    lines += [f"    {'total (peak)':<32}{report.peak / unit:>9.2f}  of {report.hbm / GIB:.2f} GiB "
              + ("HBM" if report.topology.platform == "tpu" else "device memory"),
              f"  {report.verdict()}"]
    for program in report.programs:
        if program.refused:
            lines.append(f"  the TPU compiler refused {program.name}: {program.refused}")
    if report.suggestion:
        lines.append(f"  to fit: {report.suggestion}" + (f" ({report.suggestion_result})"
                                                          if report.suggestion_result else ""))
    lines.append("")
    if len(report.programs) > 1:
        w = max(18, max(len(p.name) for p in report.programs) + 1)
        lines.append(f"  {'program':<{w}}{'runs':>6}{'inputs ' + name:>12}{'temp ' + name:>10}{'peak ' + name:>10}"
                     f"{'compile s':>11}")
        for p in report.programs:
            lines.append(f"  {p.name:<{w}}{p.calls:>6}{p.arguments / unit:>12.2f}{p.temporaries / unit:>10.2f}"
                         f"{(report.state_bytes + p.transient) / unit:>10.2f}{p.lower_s + p.compile_s:>11.1f}")
        lines.append("")
    lines.append(f"  compile  {report.compile_s:.1f} s (trace, lower and compile"
                 + (f", {len(report.programs)} programs" if len(report.programs) > 1 else "") + ")")
    if report.flops_per_step:
        from jaxllm.train.flops import peak_flops
        peak = peak_flops(device.device_kind)
        at_peak = (f"; {report.flops_per_step / (len(report.devices) * peak):.2f} s per step at 100 % of "
                   f"{peak / 1e12:.0f} TFLOP/s per chip" if peak else "")
        lines.append(f"  model    {report.flops_per_step:.3g} FLOPs per step (6N + 6LHQT per token, spec §9)"
                     + at_peak)
    shown = [p for p in report.programs if p.collectives is not None]
    if shown:
        lines += ["", f"  collectives per execution, count / {name} per device (a collective inside a loop counts "
                  "once per iteration: layers, micro-batches, tokens)",
                  "    " + f"{'kind':<20}" + "".join(f"{p.name[:17]:>19}" for p in shown)]
        for kind in KINDS:
            cells = [p.collectives.by_kind[kind] for p in shown]
            lines.append("    " + f"{kind:<20}" + "".join(f"{f'{c.count} / {c.bytes / unit:.2f}':>19}"
                                                         for c in cells))
        unknown = sum(p.collectives.unknown_trip_counts for p in shown)
        if unknown:
            lines.append(f"    ({unknown} loop(s) of unknown trip count counted once)")
    lines += [f"  note: {note}" for note in report.notes]
    return "\n".join(lines).rstrip() + "\n"


def save_executables(report: Report, path: str | Path) -> Path:
    """Pickle every compiled program (`jax.experimental.serialize_executable`: payload, input and output
    trees), to load on the target with `deserialize_and_load(*programs[name], execution_devices=...)`, the
    devices in the order of `device_ids`."""
    from jax.experimental.serialize_executable import serialize

    programs = {p.name: serialize(p.compiled) for p in report.programs if p.compiled is not None}
    if not programs:
        raise ConfigError("no executable to save: the compiler refused every program")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        pickle.dump({"topology": report.topology.name, "mesh": dict(report.mesh.shape), "jax": jax.__version__,
                     "device_ids": [d.id for d in report.devices], "programs": programs}, f)
    tmp.replace(path)
    return path
