"""Compile time of the jitted train step (forward + backward + AdamW) for 2 vs 32 layers.

Layers are stacked and run with `nn.scan`, so XLA compiles one block whatever the depth: the compile time
should be nearly flat. Shapes only (abstract inputs): nothing is allocated, so 32 layers of a wide model
compile on a laptop.

    python bench/compile_time.py                  # hidden 1024, seq 512
    python bench/compile_time.py --hidden 4096    # Llama-2-7B widths
"""
from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 32])
    parser.add_argument("--remat", default="full")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp

    from jaxllm.models import get_preset, param_logical_axes, param_shapes
    from jaxllm.train.config import OptimizerConfig
    from jaxllm.train.loss import lm_loss
    from jaxllm.train.optim import make_optimizer
    from jaxllm.train.step import make_train_step

    print(f"hidden {args.hidden}, seq {args.seq}, batch {args.batch}, remat {args.remat}, "
          f"{jax.devices()[0].platform}")
    print(f"{'layers':>6} {'params (M)':>11} {'trace+lower s':>14} {'compile s':>10}")
    base = None
    for layers in args.layers:
        cfg = get_preset("llama2-7b", hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3 // 64 * 64,
                         num_heads=args.hidden // 128, num_layers=layers, remat=args.remat, dtype="bfloat16")
        optimizer, schedule = make_optimizer(OptimizerConfig(warmup_steps=10), 1000, param_logical_axes(cfg))
        step = jax.jit(make_train_step(lm_loss(cfg), optimizer, schedule))
        params = param_shapes(cfg)
        opt_state = jax.eval_shape(optimizer.init, params)
        row = jax.ShapeDtypeStruct((1, args.batch, args.seq), jnp.int32)
        batch = {"tokens": row, "targets": row, "segment_ids": row, "positions": row,
                 "loss_mask": jax.ShapeDtypeStruct((1, args.batch, args.seq), jnp.float32)}
        t0 = time.perf_counter()
        lowered = step.lower(params, opt_state, batch, jax.random.key(0), jnp.int32(0))
        t1 = time.perf_counter()
        lowered.compile()
        t2 = time.perf_counter()
        n = sum(x.size for x in jax.tree.leaves(params)) / 1e6
        print(f"{layers:>6} {n:>11.1f} {t1 - t0:>14.2f} {t2 - t1:>10.2f}")
        base = base or (t2 - t0)
        last = t2 - t0
    print(f"\n{args.layers[-1]} vs {args.layers[0]} layers: total {last / base:.2f}x the time "
          f"for {args.layers[-1] / args.layers[0]:.0f}x the depth")


if __name__ == "__main__":
    main()
