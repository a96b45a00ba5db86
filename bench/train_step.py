"""Tokens/s of jaxllm's jitted train step against PyTorch `transformers` LlamaForCausalLM + torch.optim.AdamW,
on the same architecture, batch and optimizer settings, in the same process on the same machine (torch on
CUDA when there is a GPU), and the MFU of each where the device's peak FLOP/s is known.

    python bench/train_step.py                      # the demo preset, batch 16 × 128 tokens, float32, CPU
    python bench/train_step.py --preset llama2-tiny --batch 8 --seq-len 64 --steps 30
    python bench/train_step.py --preset llama2-7b --set num_layers=4 --dtype bfloat16 --batch 4 \
        --seq-len 4096 --set remat=dots                              # a GPU: Llama-2 layers at seq 4096

Both sides: AdamW (0.9, 0.95, eps 1e-5, wd 0.1 except norms), global-norm clipping at 1.0, next-token
cross-entropy on every position, random tokens, fp32 master weights (bf16 compute with --dtype bfloat16:
jaxllm's compute dtype, torch's autocast). For Llama-layout presets both start from the same weights (the
PyTorch model's, converted), so the final losses agree: the two sides do the same work. Timed steps follow
untimed warm-up steps (compilation for JAX).
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np


def train_step_and_optimizer(cfg, steps):
    """jaxllm's jitted train step (params and optimizer state donated) and its optax optimizer."""
    import jax

    from jaxllm.models import param_logical_axes
    from jaxllm.train.config import OptimizerConfig
    from jaxllm.train.loss import lm_loss
    from jaxllm.train.optim import make_optimizer
    from jaxllm.train.step import make_train_step

    optimizer, schedule = make_optimizer(OptimizerConfig(lr=1e-3, warmup_steps=0, schedule="constant"),
                                         steps, param_logical_axes(cfg))
    return jax.jit(make_train_step(lm_loss(cfg), optimizer, schedule), donate_argnums=(0, 1)), optimizer


def random_batch(cfg, batch, seq_len, seed=0):
    """One micro-batch of random tokens in the train step's layout (leading grad-accumulation axis)."""
    tokens = np.random.default_rng(seed).integers(3, cfg.vocab_size, (batch, seq_len + 1)).astype(np.int32)
    return {"tokens": tokens[None, :, :-1], "targets": tokens[None, :, 1:],
            "loss_mask": np.ones((1, batch, seq_len), np.float32),
            "segment_ids": np.ones((1, batch, seq_len), np.int32),
            "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (1, batch, seq_len)).copy()}


def abstract_step_inputs(cfg, optimizer, batch, seq_len):
    """Shapes of the train step's arguments (params, optimizer state, batch, rng, step): enough to compile
    it without allocating anything."""
    import jax
    import jax.numpy as jnp

    from jaxllm.models import param_shapes

    params = param_shapes(cfg)
    data = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), random_batch(cfg, batch, seq_len))
    return (params, jax.eval_shape(optimizer.init, params), data, jax.eval_shape(jax.random.key, 0),
            jax.ShapeDtypeStruct((), jnp.int32))


def time_steps(step, params, opt_state, data, steps, warmup):
    """(seconds per step, final loss) over `steps` calls after `warmup` untimed ones."""
    import jax
    import jax.numpy as jnp

    rng = jax.random.key(1)
    for i in range(warmup):
        params, opt_state, metrics = step(params, opt_state, data, rng, jnp.int32(i))
    jax.block_until_ready((params, opt_state))
    start = time.perf_counter()
    for i in range(steps):
        params, opt_state, metrics = step(params, opt_state, data, rng, jnp.int32(i))
    jax.block_until_ready(metrics)
    return (time.perf_counter() - start) / steps, float(metrics["loss"])


def jax_tokens_per_second(cfg, batch, seq_len, steps, warmup, seed=0, params=None):
    import jax

    from jaxllm.models import init_params

    step, optimizer = train_step_and_optimizer(cfg, steps)
    params = init_params(cfg, jax.random.key(seed)) if params is None else jax.device_put(params)
    opt_state = jax.jit(optimizer.init)(params)
    seconds, loss = time_steps(step, params, opt_state, jax.device_put(random_batch(cfg, batch, seq_len, seed)),
                               steps, warmup)
    return batch * seq_len / seconds, seconds, loss


def torch_model(cfg, seq_len, seed=0):
    """A randomly initialised `transformers` Llama with jaxllm's architecture, on the CPU, in fp32."""
    import torch
    import transformers

    torch.manual_seed(seed)
    hf = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
        max_position_embeddings=max(cfg.max_position_embeddings, seq_len), tie_word_embeddings=cfg.tie_embeddings,
        attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(hf)


def shared_params(model, cfg):
    """The PyTorch model's weights as jaxllm params when both compute the same function (the Llama
    layout, RoPE, plain head, no max-z loss), else None: other families are timed on a Llama of their
    sizes in PyTorch, which does the same FLOPs but not the same maths."""
    from jaxllm.convert.mapping import BAICHUAN_FAMILIES, hf_to_params

    if cfg.family in BAICHUAN_FAMILIES or cfg.position != "rope" or cfg.norm_head or cfg.z_loss_weight:
        return None
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    return hf_to_params(state.__getitem__, cfg)


def torch_tokens_per_second(model, cfg, batch, seq_len, steps, warmup, seed=0):
    """The same step in PyTorch on the same device kind: fp32 master weights, bf16 autocast when jaxllm
    computes in bf16, AdamW without decay on norm weights, clipping at 1.0."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device).train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]  # norm weights, as jaxllm's decay mask
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=1e-3, betas=(0.9, 0.95), eps=1e-5, fused=device == "cuda")
    tokens = torch.from_numpy(
        np.random.default_rng(seed).integers(3, cfg.vocab_size, (batch, seq_len + 1)).astype(np.int64)).to(device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def one_step():
        with autocast:
            logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return loss.detach()

    for _ in range(warmup):
        one_step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        loss = one_step()
    sync()
    elapsed = time.perf_counter() - start
    return batch * seq_len * steps / elapsed, elapsed / steps, float(loss)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a model field, e.g. --set num_layers=16 --set remat=dots")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--attention", default="auto", choices=["auto", "reference", "xla", "cudnn", "splash"],
                        help="jaxllm attention implementation")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference (e.g. too big)")
    args = parser.parse_args(argv)

    from jaxllm.xla_flags import apply_gpu_flags
    apply_gpu_flags()  # as the jaxllm command does, before JAX starts

    import jax
    import torch
    import yaml

    from jaxllm.models import count_params, get_preset
    from jaxllm.train.flops import flops_per_token, mfu, peak_flops

    torch.set_num_threads(os.cpu_count() or 1)
    fields = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
    cfg = get_preset(args.preset, dtype=args.dtype, attention=args.attention, **fields)
    device = jax.devices()[0]
    peak = peak_flops(device.device_kind)
    per_token = flops_per_token(cfg, args.seq_len)
    print(f"{args.preset}{' ' + ' '.join(args.set) if args.set else ''}: {count_params(cfg) / 1e6:.2f}M parameters, "
          f"batch {args.batch} × {args.seq_len} tokens, {args.dtype}, remat {cfg.remat}, jaxllm attention="
          f"{args.attention}; {args.steps} timed steps after {args.warmup} warm-up; "
          f"{per_token / 1e9:.3f} GFLOP/token (spec §9, causal attention halved)")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; jax {jax.__version__} "
          f"on {device.platform} ({device.device_kind}); torch {torch.__version__} "
          f"({'cuda' if torch.cuda.is_available() else f'{torch.get_num_threads()} CPU threads'})\n")
    params = model = None
    if not args.no_torch:
        model = torch_model(cfg, args.seq_len)
        params = shared_params(model, cfg)
    results = {"jaxllm (jax.jit)": jax_tokens_per_second(cfg, args.batch, args.seq_len, args.steps, args.warmup,
                                                         params=params)}
    if model is not None:
        results["transformers + torch AdamW"] = torch_tokens_per_second(model, cfg, args.batch, args.seq_len,
                                                                        args.steps, args.warmup)
    width = max(map(len, results))
    print(f"{'implementation':<{width}}  {'ms/step':>9}  {'tokens/s':>10}  {'TFLOP/s':>8}  {'MFU':>6}  "
          f"{'final loss':>10}")
    for name, (tps, seconds, loss) in results.items():
        utilisation = mfu(tps, per_token, 1, peak)
        print(f"{name:<{width}}  {seconds * 1e3:9.1f}  {tps:10.0f}  {tps * per_token / 1e12:8.3f}  "
              f"{'-' if utilisation is None else f'{utilisation:.1%}':>6}  {loss:10.4f}")
    if len(results) == 2:
        (ours, _, loss_ours), (theirs, _, loss_theirs) = results.values()
        print(f"\nratio jaxllm / PyTorch: {ours / theirs:.2f}x tokens/s")
        if params is not None:
            print(f"final loss, same initial weights and data: relative difference "
                  f"{abs(loss_ours - loss_theirs) / abs(loss_theirs):.1e}")
        else:
            print(f"(PyTorch ran a Llama of {args.preset}'s sizes: the same FLOPs, other maths and weights)")
    if peak is None:
        print(f"(MFU: no peak FLOP/s known for {device.device_kind})")


if __name__ == "__main__":
    main()
