"""MFU of jaxllm's train step over depths, remat policies and batch sizes on one device: which settings
fit, how fast each runs, and the best per model size.

Each setting is compiled from abstract shapes first; XLA's memory analysis says whether it fits in the
device's memory before anything is allocated, so the sweep finds the largest model that trains on one
device without crashing into an out-of-memory error. Settings that fit are run and timed.

    python bench/mfu_sweep.py            # CPU: the demo preset, a minute; accelerators: the Llama-2 sweep below
    python bench/mfu_sweep.py --preset llama2-7b --layers 4 8 16 32 --seq-len 4096 --dtype bfloat16 \\
        --remat none dots_no_batch dots full --batch 1 2 4 8     # one H100/H200: ~1B (4 layers) up to 7B

Model FLOPs per token follow spec §9 (6N + 6·L·H·Q·T, causal attention halved); MFU divides by the
device kind's dense bf16 peak (`jaxllm/train/flops.py`; `--peak-tflops` for others).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

ACCELERATOR = {"preset": "llama2-7b", "layers": [4, 8, 16, 32], "seq_len": 4096, "dtype": "bfloat16",
               "remat": ["none", "dots_no_batch", "dots", "full"], "batch": [1, 2, 4, 8]}
CPU = {"preset": "demo", "layers": [2, 4], "seq_len": 128, "dtype": "float32", "remat": ["none", "full"],
       "batch": [4, 8]}


def human(count: int) -> str:
    return f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.1f}M"


def device_memory(device) -> int:
    """Bytes one device can hold: the allocator's limit on accelerators, physical memory on CPU."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def compile_step(cfg, batch, seq_len, steps):
    """The train step compiled for `cfg` from shapes alone, its optimizer and the bytes it needs."""
    from train_step import abstract_step_inputs, train_step_and_optimizer

    step, optimizer = train_step_and_optimizer(cfg, steps)
    compiled = step.lower(*abstract_step_inputs(cfg, optimizer, batch, seq_len)).compile()
    memory = compiled.memory_analysis()
    need = getattr(memory, "peak_memory_in_bytes", 0) or (
        memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes)
    return compiled, optimizer, need


def run(cfg, batch, seq_len, steps, warmup, capacity):
    """(bytes needed, seconds per step or None when it does not fit, why)."""
    import jax
    from train_step import random_batch, time_steps

    from jaxllm.models import init_params

    compiled, optimizer, need = compile_step(cfg, batch, seq_len, steps)
    if need > 0.95 * capacity:
        return need, None, "does not fit"
    try:
        params = init_params(cfg, jax.random.key(0))
        opt_state = jax.jit(optimizer.init)(params)
        seconds, _ = time_steps(compiled, params, opt_state, jax.device_put(random_batch(cfg, batch, seq_len)),
                                steps, warmup)
    except Exception as err:
        if "RESOURCE_EXHAUSTED" not in str(err) and "out of memory" not in str(err).lower():
            raise
        return need, None, "out of memory"
    return need, seconds, ""


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset")
    parser.add_argument("--layers", type=int, nargs="+", help="depths to try (the preset's widths)")
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype (fp32 master weights)")
    parser.add_argument("--remat", nargs="+", help="remat policies to try (model.remat)")
    parser.add_argument("--batch", type=int, nargs="+", help="per-device batch sizes to try")
    parser.add_argument("--attention", default="auto", choices=["auto", "reference", "xla", "cudnn", "splash"])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per setting")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--memory-gb", type=float, help="device memory to plan for (default: the device's)")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak, when its kind is not known")
    args = parser.parse_args(argv)

    from jaxllm.xla_flags import apply_gpu_flags
    apply_gpu_flags()

    import jax

    from jaxllm.config import ConfigError
    from jaxllm.models import count_params, get_preset
    from jaxllm.train.flops import flops_per_token, mfu, peak_flops

    device = jax.devices()[0]
    defaults = CPU if device.platform == "cpu" else ACCELERATOR
    preset, seq_len, dtype = (args.preset or defaults["preset"], args.seq_len or defaults["seq_len"],
                              args.dtype or defaults["dtype"])
    layers, remats, batches = (args.layers or defaults["layers"], args.remat or defaults["remat"],
                               args.batch or defaults["batch"])
    try:  # every setting is checked before the first one compiles
        configs = {(depth, remat): get_preset(preset, num_layers=depth, remat=remat, dtype=dtype,
                                              attention=args.attention) for depth in layers for remat in remats}
    except (ConfigError, KeyError, ValueError) as err:
        raise SystemExit(f"mfu_sweep: {err}") from None
    capacity = int(args.memory_gb * 2**30) if args.memory_gb else device_memory(device)
    peak = peak_flops(device.device_kind, args.peak_tflops)
    print(f"{preset} widths, seq {seq_len}, {dtype} compute, attention={args.attention}; {device.platform} "
          f"({device.device_kind}), {capacity / 2**30:.1f} GiB; jax {jax.__version__}; "
          f"{args.steps} timed steps after {args.warmup}\n")
    header = (f"{'layers':>6} {'params':>8} {'remat':>13} {'batch':>5} {'need GiB':>9} {'ms/step':>9} "
              f"{'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6}")
    print(header)
    best = {}
    for (depth, remat), cfg in configs.items():
        for batch in batches:
            per_token = flops_per_token(cfg, seq_len)
            need, seconds, why = run(cfg, batch, seq_len, args.steps, args.warmup, capacity)
            size = human(count_params(cfg))
            row = f"{depth:>6} {size:>8} {remat:>13} {batch:>5} {need / 2**30:>9.2f} "
            if seconds is None:
                print(row + f"{why:>9}", flush=True)
                continue
            tps = batch * seq_len / seconds
            utilisation = mfu(tps, per_token, 1, peak)
            print(row + f"{seconds * 1e3:>9.1f} {tps:>10.0f} {tps * per_token / 1e12:>8.3f} "
                  f"{'-' if utilisation is None else f'{utilisation:.1%}':>6}", flush=True)
            if depth not in best or tps * per_token > best[depth][0]:
                best[depth] = (tps * per_token, size, remat, batch, utilisation)
    print("\nbest per depth (model TFLOP/s):")
    for depth, (flops, size, remat, batch, utilisation) in best.items():
        print(f"  {depth} layers ({size}): remat {remat}, batch {batch}: {flops / 1e12:.3f} TFLOP/s"
              + ("" if utilisation is None else f", MFU {utilisation:.1%}"))
    missing = [d for d in layers if d not in best]
    if missing:
        print(f"  no setting fits at {', '.join(map(str, missing))} layers")


if __name__ == "__main__":
    main()
