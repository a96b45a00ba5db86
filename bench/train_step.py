"""Tokens/s of jaxllm's jitted train step against PyTorch `transformers` LlamaForCausalLM + torch.optim.AdamW,
on the same architecture, batch and optimizer settings, in the same process on the same machine.

    python bench/train_step.py                      # the demo preset, batch 16 × 128 tokens, float32, CPU
    python bench/train_step.py --preset llama2-tiny --batch 8 --seq-len 64 --steps 30

Both sides: AdamW (0.9, 0.95, eps 1e-5, wd 0.1), global-norm clipping at 1.0, next-token cross-entropy on
every position, random tokens. Timed steps follow untimed warm-up steps (compilation for JAX).
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np


def jax_tokens_per_second(cfg, batch, seq_len, steps, warmup, seed=0):
    import jax
    import jax.numpy as jnp

    from jaxllm.models import init_params, param_logical_axes
    from jaxllm.train.config import OptimizerConfig
    from jaxllm.train.loss import lm_loss
    from jaxllm.train.optim import make_optimizer
    from jaxllm.train.step import make_train_step

    optimizer, schedule = make_optimizer(OptimizerConfig(lr=1e-3, warmup_steps=0, schedule="constant"),
                                         steps, param_logical_axes(cfg))
    step = jax.jit(make_train_step(lm_loss(cfg), optimizer, schedule), donate_argnums=(0, 1))
    params = init_params(cfg, jax.random.key(seed))
    opt_state = jax.jit(optimizer.init)(params)
    tokens = np.random.default_rng(seed).integers(3, cfg.vocab_size, (batch, seq_len + 1)).astype(np.int32)
    data = {"tokens": tokens[None, :, :-1], "targets": tokens[None, :, 1:],
            "loss_mask": np.ones((1, batch, seq_len), np.float32),
            "segment_ids": np.ones((1, batch, seq_len), np.int32),
            "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (1, batch, seq_len)).copy()}
    data = jax.device_put(data)
    rng = jax.random.key(1)
    for i in range(warmup):
        params, opt_state, metrics = step(params, opt_state, data, rng, jnp.int32(i))
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for i in range(steps):
        params, opt_state, metrics = step(params, opt_state, data, rng, jnp.int32(i))
    jax.block_until_ready(metrics)
    elapsed = time.perf_counter() - start
    return batch * seq_len * steps / elapsed, elapsed / steps, float(metrics["loss"])


def torch_tokens_per_second(cfg, batch, seq_len, steps, warmup, seed=0):
    import torch
    import transformers

    torch.manual_seed(seed)
    hf = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_embeddings,
        attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(hf).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1)
    tokens = torch.from_numpy(
        np.random.default_rng(seed).integers(3, cfg.vocab_size, (batch, seq_len + 1)).astype(np.int64))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def one_step():
        logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return loss.detach()

    for _ in range(warmup):
        one_step()
    start = time.perf_counter()
    for _ in range(steps):
        loss = one_step()
    elapsed = time.perf_counter() - start
    return batch * seq_len * steps / elapsed, elapsed / steps, float(loss)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--attention", default="auto", choices=["auto", "reference", "xla", "cudnn"],
                        help="jaxllm attention implementation")
    args = parser.parse_args(argv)

    import jax
    import torch

    from jaxllm.models import count_params, get_preset

    torch.set_num_threads(os.cpu_count() or 1)
    cfg = get_preset(args.preset, dtype=args.dtype, attention=args.attention)
    device = jax.devices()[0]
    print(f"{args.preset}: {count_params(cfg) / 1e6:.2f}M parameters, batch {args.batch} × {args.seq_len} "
          f"tokens, {args.dtype}, jaxllm attention={args.attention}; {args.steps} timed steps after "
          f"{args.warmup} warm-up")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; jax {jax.__version__} "
          f"on {device.platform} ({device.device_kind}); torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)\n")
    results = {}
    results["jaxllm (jax.jit)"] = jax_tokens_per_second(cfg, args.batch, args.seq_len, args.steps, args.warmup)
    results["transformers + torch AdamW"] = torch_tokens_per_second(cfg, args.batch, args.seq_len, args.steps,
                                                                    args.warmup)
    width = max(map(len, results))
    print(f"{'implementation':<{width}}  {'ms/step':>9}  {'tokens/s':>10}  {'final loss':>10}")
    for name, (tps, seconds, loss) in results.items():
        print(f"{name:<{width}}  {seconds * 1e3:9.1f}  {tps:10.0f}  {loss:10.4f}")
    ours, theirs = results["jaxllm (jax.jit)"][0], results["transformers + torch AdamW"][0]
    print(f"\nratio jaxllm / PyTorch: {ours / theirs:.2f}x tokens/s")


if __name__ == "__main__":
    main()
