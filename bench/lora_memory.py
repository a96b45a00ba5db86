"""Device memory of the real train step, LoRA against full fine-tuning, by compiling it for a chip this machine
does not have: `plan_run` plans the run for the target's devices (a TPU topology from libtpu's ahead-of-time
compiler), its jitted step is lowered from abstract inputs and XLA's memory analysis of the compiled program
says what one chip must hold. Nothing is allocated, so a 7B plan compiles on a laptop (slowly).

    python bench/lora_memory.py        # Llama-2-7B SFT, seq 2048, TPU v5e-1 (Colab's TPU)
    python bench/lora_memory.py --settings lora:bfloat16:full:1 lora:int8:full:4 full:-:full:1
    python bench/lora_memory.py --settings lora:bfloat16:full:1:reference lora:bfloat16:full:1   # einsum vs fused
    python bench/lora_memory.py --preset llama2-tiny --seq-len 64 --topology cpu-1    # the test's tiny run

Each row is the pre-flight of `jaxllm sft … --compile-only --topology v5e-1` (`jaxllm.preflight.train`):
total is the chip's peak (state + the step's other inputs, outputs, temporaries and code), against the
TPU compiler's HBM limit.

A setting is KIND:BASE_DTYPE:REMAT:BATCH: KIND `lora` (rank --rank on every projection, the frozen base in
BASE_DTYPE: bfloat16, int8 or int4) or `full` (every weight trains: float32 parameters and AdamW moments).
Both compute in bfloat16 with one micro-batch of BATCH rows. An optional fifth field is `model.attention`
(default auto: the fused splash kernel on TPU; `reference`: the einsum path).
"""
from __future__ import annotations

import argparse

DEFAULT = ["lora:bfloat16:full:1", "lora:bfloat16:full:2", "lora:int8:full:4", "lora:int4:full:8", "full:-:full:1"]


def run_config(preset: str, kind: str, base_dtype: str, remat: str, batch: int, seq_len: int, rank: int,
               attention: str = "auto", loss_chunk: int = 0):
    from jaxllm.train.config import from_dict

    data = {"preset": preset, "remat": remat, "dtype": "bfloat16", "max_position_embeddings": max(seq_len, 128),
            "attention": attention, "loss_chunk": loss_chunk}
    config = {"model": data, "init_from": "base-not-read", "data": {"seq_len": seq_len},
              "train": {"steps": 100, "batch_size": batch}, "mesh": {"data": 1, "fsdp": -1, "tensor": 1},
              "optimizer": {"warmup_steps": 0}}
    if kind == "lora":
        config["lora"] = {"rank": rank, "alpha": 2 * rank, "targets": "all", "base_dtype": base_dtype}
    return from_dict(config)


def measure(config, topology):
    """The pre-flight report (`jaxllm sft --compile-only`) of the SFT step planned by `config`."""
    from jaxllm.stages.stages import sft_objective
    from jaxllm.preflight.train import preflight_train

    return preflight_train(config, sft_objective, topology, suggest=False, log=lambda *_: None)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama2-7b")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--topology", default="v5e-1", help="a pre-flight topology (v5e-1, v5p-8, cpu-1, ...)")
    parser.add_argument("--settings", nargs="+", default=DEFAULT, help="KIND:BASE_DTYPE:REMAT:BATCH ...")
    parser.add_argument("--loss-chunk", type=int, default=0, help="model.loss_chunk of every setting (0: off)")
    parser.add_argument("--unit", choices=("GiB", "MiB"), default="GiB", help="of the table (MiB for tiny models)")
    args = parser.parse_args(argv)

    from jaxllm.preflight import topology as topologies
    from jaxllm.config import ConfigError

    settings = []
    try:  # every setting is checked before the first (slow) compile
        for text in args.settings:
            kind, base_dtype, remat, batch, *attention = text.split(":")
            if kind not in ("lora", "full") or len(attention) > 1:
                raise ConfigError(f"setting {text!r}: KIND must be lora or full, as "
                                  f"KIND:BASE_DTYPE:REMAT:BATCH[:ATTENTION]")
            settings.append((text, run_config(args.preset, kind, base_dtype, remat, int(batch), args.seq_len,
                                              args.rank, *(attention or ["auto"]), loss_chunk=args.loss_chunk)))
        topology = topologies.parse(args.topology)
    except (ConfigError, ValueError) as err:
        raise SystemExit(f"lora_memory: {err}") from None
    tpu = topology.platform == "tpu"
    print(f"{args.preset}, seq {args.seq_len}, bf16 compute, LoRA rank {args.rank} on q/k/v/o/gate/up/down, "
          f"loss_chunk {args.loss_chunk}; compiled for {topology.describe()}\n")
    u = args.unit
    print(f"{'setting':<32}  {'trainable ' + u:>13}  {'Adam ' + u:>8}  {'frozen ' + u:>10}  {'temp ' + u:>8}  "
          f"{'total ' + u:>9}  {'fits':>4}  {'compile s':>9}")
    gib, refused = (2**30 if u == "GiB" else 2**20), False
    for text, config in settings:
        report = measure(config, topology)
        state, program = report.state, report.programs[0]
        fits = ("yes" if report.fits else "no") if tpu else "-"
        temp = "-" if program.refused else f"{program.temporaries / gib:.3f}"
        print(f"{text:<32}  {state['parameters'] / gib:>13.3f}  {state['optimizer state'] / gib:>8.3f}  "
              f"{state.get('frozen base', 0) / gib:>10.3f}  {temp:>8}  {report.peak / gib:>9.3f}  "
              f"{fits:>4}  {report.compile_s:>9.1f}", flush=True)
        refused = refused or report.refused
    if refused:
        print("\ntemp '-': the TPU compiler refused the program (out of HBM); total is at least the need it reported")


if __name__ == "__main__":
    main()
