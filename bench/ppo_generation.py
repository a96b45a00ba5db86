"""PPO rollouts: generating with the FSDP-sharded training weights vs gathering them first (Llama 2 §3.2.3).

Under FSDP every decode step all-gathers each layer's weights: Llama 2 saw generation ~20× slower and
consolidated the weights on each node before generating, freeing them after. Both are timed here on the
same mesh, the same prompts and the same greedy tokens: "sharded" decodes with the training layout,
"gathered" first lays a copy out with the FSDP axis unused (jaxllm's `ppo.generation=gathered`, the
default; the copy is part of the timing) and drops it after. Compilation is excluded.

    python bench/ppo_generation.py                   # 8 fake CPU devices, a ~25M-parameter Llama
    python bench/ppo_generation.py --devices 0 --hidden 2048 --layers 16   # the machine's accelerators
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=8, help="fake CPU devices (0: use the real devices)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=16, help="rollouts (prompts) per generation")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.devices:
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.devices}".strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import jax
    import numpy as np

    from jaxllm.inference import SamplingParams, generate
    from jaxllm.models import count_params, get_preset, init_params, param_logical_axes
    from jaxllm.rlhf.rollout import generation_params
    from jaxllm.models import param_shardings
    from jaxllm.sharding import make_mesh

    devices = jax.devices()
    if args.batch % len(devices):
        sys.exit(f"ppo_generation: --batch {args.batch} does not split over {len(devices)} devices")
    cfg = get_preset("llama2-7b", hidden_size=args.hidden, intermediate_size=int(args.hidden * 8 / 3 // 64 * 64),
                     num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.heads, vocab_size=args.vocab,
                     max_position_embeddings=1024, dtype="float32")
    mesh = make_mesh(data=1, fsdp=-1, tensor=1)  # PPO's training layout: ZeRO-3 style
    params = init_params(cfg, jax.random.key(0), param_shardings(cfg, mesh))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, args.vocab, args.prompt_len).tolist() for _ in range(args.batch)]
    sampling = SamplingParams(temperature=0.0, max_new_tokens=args.new_tokens)
    print(f"model: {count_params(cfg) / 1e6:.1f}M parameters, {cfg.num_layers} layers, hidden {cfg.hidden_size}; "
          f"{len(devices)} {devices[0].platform} devices, mesh fsdp={mesh.shape['fsdp']}; {args.batch} rollouts of "
          f"{args.prompt_len} + {args.new_tokens} tokens, greedy, float32; compile excluded, best of {args.repeats}")

    def rollout(layout):
        weights = generation_params(params, param_logical_axes(cfg), mesh, layout)
        out = generate(cfg, weights, prompts, sampling, jax.random.key(1), mesh=mesh)
        first = devices[0]  # bytes of weights held by one device while generating
        held = sum(s.data.nbytes for x in jax.tree.leaves(weights) for s in x.addressable_shards if s.device == first)
        del weights  # the gathered copy is freed here
        return out.tokens, held

    results = {}
    for layout in ("sharded", "gathered"):
        tokens, held = rollout(layout)  # compile
        times = []
        for _ in range(args.repeats):
            began = time.perf_counter()
            rollout(layout)
            times.append(time.perf_counter() - began)
        results[layout] = (min(times), tokens, held)
    new_tokens = args.batch * args.new_tokens
    print(f"\n{'weights while generating':<26}  {'seconds':>8}  {'tokens/s':>9}  {'weights per device':>19}")
    for layout, (seconds, _, held) in results.items():
        print(f"{layout:<26}  {seconds:>8.3f}  {new_tokens / seconds:>9.1f}  {held / 2**20:>16.3f} MiB")
    same = results["sharded"][1] == results["gathered"][1]
    ratio = results["sharded"][0] / results["gathered"][0]
    print(f"\nratio sharded / gathered time: {ratio:.2f}x; greedy tokens identical: {same}; the whole model is "
          f"{count_params(cfg) * 4 / 2**20:.3f} MiB")


if __name__ == "__main__":
    main()
