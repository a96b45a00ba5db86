"""Compile time of the jitted train step (forward + backward + AdamW) for 2 vs 32 layers.

Layers are stacked and run with `nn.scan`, so XLA compiles one block whatever the depth: the compile time
should be nearly flat. Shapes only (abstract inputs): nothing is allocated, so 32 layers of a wide model
compile on a laptop.

    python bench/compile_time.py                  # hidden 1024, seq 512
    python bench/compile_time.py --hidden 4096    # Llama-2-7B widths
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 32])
    parser.add_argument("--remat", default="full")
    args = parser.parse_args()

    import jax
    from train_step import abstract_step_inputs, train_step_and_optimizer

    from jaxllm.models import count_params, get_preset

    print(f"hidden {args.hidden}, seq {args.seq}, batch {args.batch}, remat {args.remat}, "
          f"{jax.devices()[0].platform}")
    print(f"{'layers':>6} {'params (M)':>11} {'trace+lower s':>14} {'compile s':>10}")
    base = None
    for layers in args.layers:
        cfg = get_preset("llama2-7b", hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3 // 64 * 64,
                         num_heads=args.hidden // 128, num_layers=layers, remat=args.remat, dtype="bfloat16")
        step, optimizer = train_step_and_optimizer(cfg, 1000)
        inputs = abstract_step_inputs(cfg, optimizer, args.batch, args.seq)
        t0 = time.perf_counter()
        lowered = step.lower(*inputs)
        t1 = time.perf_counter()
        lowered.compile()
        t2 = time.perf_counter()
        n = count_params(cfg) / 1e6
        print(f"{layers:>6} {n:>11.1f} {t1 - t0:>14.2f} {t2 - t1:>10.2f}")
        base = base or (t2 - t0)
        last = t2 - t0
    print(f"\n{args.layers[-1]} vs {args.layers[0]} layers: total {last / base:.2f}x the time "
          f"for {args.layers[-1] / args.layers[0]:.0f}x the depth")


if __name__ == "__main__":
    main()
