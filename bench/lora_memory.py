"""Device memory of the real train step, LoRA against full fine-tuning, by compiling it for a chip this machine
does not have: `plan_run` plans the run for the target's devices (a TPU topology from libtpu's ahead-of-time
compiler), its jitted step is lowered from abstract inputs and XLA's memory analysis of the compiled program
says what one chip must hold. Nothing is allocated, so a 7B plan compiles on a laptop (slowly).

    python bench/lora_memory.py        # Llama-2-7B SFT, seq 2048, TPU v5e-1 (16 GiB, Colab's TPU)
    python bench/lora_memory.py --settings lora:bfloat16:full:1 lora:int8:full:4 full:-:full:1
    python bench/lora_memory.py --preset llama2-tiny --seq-len 64 --topology cpu      # the test's tiny run

A setting is KIND:BASE_DTYPE:REMAT:BATCH: KIND `lora` (rank --rank on every projection, the frozen base in
BASE_DTYPE: bfloat16, int8 or int4) or `full` (every weight trains: float32 parameters and AdamW moments).
Both compute in bfloat16 with one micro-batch of BATCH rows.
"""
from __future__ import annotations

import argparse
import os
import re
import time

DEFAULT = ["lora:bfloat16:full:1", "lora:bfloat16:full:2", "lora:int8:full:4", "lora:int4:full:8", "full:-:full:1"]
CAPACITY_GIB = {"v5e:1x1": 16.0}


def target_devices(topology: str):
    """The devices to plan for: a TPU topology (compile-only) or this machine's first device ('cpu')."""
    import jax

    if topology == "cpu":
        return jax.devices()[:1]
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # another process may hold libtpu's lock file
    from jax.experimental import topologies

    return topologies.get_topology_desc(topology_name=topology, platform="tpu",
                                        chips_per_host_bounds=(1, 1, 1)).devices


def run_config(preset: str, kind: str, base_dtype: str, remat: str, batch: int, seq_len: int, rank: int):
    from jaxllm.train.config import from_dict

    data = {"preset": preset, "remat": remat, "dtype": "bfloat16", "max_position_embeddings": max(seq_len, 128)}
    config = {"model": data, "init_from": "base-not-read", "data": {"seq_len": seq_len},
              "train": {"steps": 100, "batch_size": batch}, "mesh": {"data": 1, "fsdp": -1, "tensor": 1},
              "optimizer": {"warmup_steps": 0}}
    if kind == "lora":
        config["lora"] = {"rank": rank, "alpha": 2 * rank, "targets": "all", "base_dtype": base_dtype}
    return from_dict(config)


def measure(config, devices):
    """(bytes by kind, compile seconds) of the planned step on `devices`."""
    import jax
    import jax.numpy as jnp

    from jaxllm.train.loop import plan_run
    from jaxllm.train.loss import lm_loss
    from jaxllm.train.stage import Stage

    stage = Stage(loss_fn=lm_loss(config.model), make_data=None, name="sft")
    plan = plan_run(config, stage, devices)
    rows, seq = config.train.batch_size, config.data.seq_len
    batch = {k: jax.ShapeDtypeStruct((1, rows, seq), jnp.float32 if k == "loss_mask" else jnp.int32)
             for k in ("tokens", "targets", "positions", "segment_ids", "loss_mask")}
    from jaxllm.models.quant import nbytes as size  # int4 counts half a byte, as the chip stores it
    parts = {"trainable": size(plan.param_shapes), "optimizer": size(plan.opt_shapes),
             "frozen": size(plan.lora.frozen_shapes) if plan.lora is not None else 0}
    start = time.perf_counter()
    try:
        compiled = plan.step_fn.lower(*plan.abstract_args(batch)).compile()
    except jax.errors.JaxRuntimeError as err:
        # The TPU compiler refuses a program that cannot fit and says how much it needs.
        need = re.search(r"required for HLO temporaries \(([\d.]+)([GMK])\)", str(err))
        if "RESOURCE_EXHAUSTED" not in str(err) or need is None:
            raise
        unit = {"G": 2**30, "M": 2**20, "K": 2**10}[need.group(2)]
        return {**parts, "temp": None, "total": float(need.group(1)) * unit, "refused": True}, \
            time.perf_counter() - start
    seconds = time.perf_counter() - start
    m = compiled.memory_analysis()
    parts.update(temp=m.temp_size_in_bytes, total=m.argument_size_in_bytes + m.output_size_in_bytes
                 - m.alias_size_in_bytes + m.temp_size_in_bytes)
    return parts, seconds


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama2-7b")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--topology", default="v5e:1x1", help="TPU topology name, or 'cpu' for this machine")
    parser.add_argument("--settings", nargs="+", default=DEFAULT, help="KIND:BASE_DTYPE:REMAT:BATCH ...")
    parser.add_argument("--memory-gib", type=float, help="the chip's memory (default: 16 for v5e:1x1)")
    parser.add_argument("--unit", choices=("GiB", "MiB"), default="GiB", help="of the table (MiB for tiny models)")
    args = parser.parse_args(argv)

    from jaxllm.config import ConfigError

    settings = []
    try:  # every setting is checked before the first (slow) compile
        for text in args.settings:
            kind, base_dtype, remat, batch = text.split(":")
            if kind not in ("lora", "full"):
                raise ConfigError(f"setting {text!r}: KIND must be lora or full")
            settings.append((text, run_config(args.preset, kind, base_dtype, remat, int(batch), args.seq_len,
                                              args.rank)))
    except (ConfigError, ValueError) as err:
        raise SystemExit(f"lora_memory: {err}") from None
    devices = target_devices(args.topology)
    capacity = args.memory_gib or CAPACITY_GIB.get(args.topology)
    print(f"{args.preset}, seq {args.seq_len}, bf16 compute, LoRA rank {args.rank} on q/k/v/o/gate/up/down; "
          f"compiled for {args.topology} ({devices[0].device_kind})"
          + (f", {capacity:.0f} GiB per chip" if capacity else "") + "\n")
    u = args.unit
    print(f"{'setting':<24}  {'trainable ' + u:>13}  {'Adam ' + u:>8}  {'frozen ' + u:>10}  {'temp ' + u:>8}  "
          f"{'total ' + u:>9}  {'fits':>4}  {'compile s':>9}")
    gib, refused = (2**30 if u == "GiB" else 2**20), False
    for text, config in settings:
        parts, seconds = measure(config, devices)
        fits = "-" if not capacity else ("yes" if parts["total"] <= capacity * 2**30 else "no")
        temp = "-" if parts["temp"] is None else f"{parts['temp'] / gib:.3f}"
        print(f"{text:<24}  {parts['trainable'] / gib:>13.3f}  {parts['optimizer'] / gib:>8.3f}  "
              f"{parts['frozen'] / gib:>10.3f}  {temp:>8}  {parts['total'] / gib:>9.3f}  "
              f"{fits:>4}  {seconds:>9.1f}", flush=True)
        if parts.get("refused"):
            refused = True
    if refused:
        print("\ntemp '-': the TPU compiler refused the program (out of HBM); total is the need it reported")


if __name__ == "__main__":
    main()
