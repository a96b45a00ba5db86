"""The pre-flight's command-line options, shared by `jaxllm train | sft | dpo | rm | ppo` (imports no JAX,
so `--help` stays fast)."""
from __future__ import annotations

import sys

from jaxllm.preflight import topology as topologies


def add_arguments(parser) -> None:
    group = parser.add_argument_group("compile-only pre-flight (reads no data or checkpoint, runs nothing)")
    group.add_argument("--compile-only", action="store_true",
                       help="compile the step for --topology and print memory per device vs HBM, fit and margin, "
                            "tokens per step, compile time and collectives; exit 1 when it does not fit")
    group.add_argument("--topology", metavar="NAME",
                       help="v5p-128, v5e-256, v4-64, v6e-8, v5p:2x2x1, v5e:2x2, or cpu-N (default: this host's "
                            "devices); TPU names need libtpu: pip install 'jaxllm[tpu]'")
    group.add_argument("--topology-slices", type=int, default=1, metavar="N",
                       help="a multi-slice job: N copies of the slice joined over the data-centre network")
    group.add_argument("--save-executable", metavar="PATH",
                       help="write the compiled executable(s) (jax serialize_executable, pickled)")


def topology_from_args(args, error) -> topologies.Topology | None:
    """The topology to compile for, or None without --compile-only; misuse goes to `error` (argparse)."""
    if not args.compile_only:
        for flag in ("topology", "save_executable"):
            if getattr(args, flag):
                error(f"--{flag.replace('_', '-')} needs --compile-only")
        if args.topology_slices != 1:
            error("--topology-slices needs --compile-only")
        return None
    if not args.topology:
        if args.topology_slices != 1:
            error("--topology-slices needs --topology")
        return topologies.local()
    try:
        topology = topologies.parse(args.topology, args.topology_slices)
    except topologies.TopologyError as err:
        error(str(err))
    if topology.platform == "cpu":
        topology.devices()  # before anything starts JAX: N CPU devices
    return topology


def finish(report, args, prog: str) -> int:
    """Print the report's table, save the executables if asked; 0 when it fits, 1 when it does not."""
    from jaxllm.preflight.report import save_executables

    print(report.table(), end="")
    if args.save_executable:
        print(f"executable(s) saved to {save_executables(report, args.save_executable)}")
    if not report.fits:
        print(f"{prog}: does not fit on {report.topology.name}"
              + (f"; try {report.suggestion}" if report.suggestion else ""), file=sys.stderr)
        return 1
    return 0
