"""Decode speed: jaxllm's KV-cached generation vs transformers' `generate`, same weights, same machine.

Prints tokens/s for batch 1 and 8 and the time to first token (prefill + one token), greedy, with the
ratio jaxllm / transformers. Compilation is excluded (reported separately): serving reuses programs.
Both run on the same accelerator (PyTorch on cuda when it has one, JAX on its default backend) in the
same dtype; timings wait for the device to finish.

    python bench/decode.py                      # ~60M-parameter Llama, CPU, a few minutes
    python bench/decode.py --hidden 1024 --layers 12 --new-tokens 128 --dtype bfloat16   # a GPU
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="parameters and compute, both frameworks")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import torch
    import transformers

    from jaxllm.convert.mapping import hf_to_params
    from jaxllm.inference import SamplingParams, generate
    from jaxllm.models import count_params, decoding_layout, get_preset

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count())
    cfg = get_preset("llama2-7b", hidden_size=args.hidden, intermediate_size=int(args.hidden * 8 / 3 // 64 * 64),
                     num_layers=args.layers, num_heads=args.heads, vocab_size=args.vocab,
                     max_position_embeddings=1024, dtype=args.dtype, param_dtype=args.dtype)
    hf_cfg = transformers.LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                                      intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                                      num_attention_heads=cfg.num_heads, max_position_embeddings=1024,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    params = jax.tree.map(lambda x: jnp.asarray(x, args.dtype), hf_to_params(state.__getitem__, cfg))
    params = decoding_layout(params)  # once, as `jaxllm generate`, `chat` and `serve` do
    model = model.to(device=device, dtype=getattr(torch, args.dtype))
    rng = np.random.default_rng(0)
    print(f"model: {count_params(cfg) / 1e6:.1f}M parameters, {cfg.num_layers} layers, hidden {cfg.hidden_size}; "
          f"prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy, {args.dtype}; "
          f"jaxllm on {jax.devices()[0].platform}, transformers on {device.type}")

    def jax_run(prompts, new):  # returns host lists: the device has finished
        out = generate(cfg, params, prompts, SamplingParams(temperature=0.0, max_new_tokens=new))
        return out.tokens

    def hf_run(prompts, new):
        with torch.no_grad():
            out = model.generate(torch.tensor(prompts, device=device), max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False, eos_token_id=None, pad_token_id=0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out.cpu()

    def best(fn, *a):
        times = []
        for _ in range(args.repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn(*a)
            times.append(time.perf_counter() - t)
        return min(times)

    rows = []
    for batch in (1, 8):
        prompts = rng.integers(3, cfg.vocab_size, size=(batch, args.prompt_len)).tolist()
        t = time.perf_counter()
        jax_run(prompts, args.new_tokens)
        jax_run(prompts, 1)
        compile_s = time.perf_counter() - t
        ours, theirs = np.asarray(jax_run(prompts, 8)), hf_run(prompts, 8)[:, args.prompt_len:].numpy()
        agreement = float((ours == theirs).mean())  # random init: near-tied logits may flip late tokens
        hf_run(prompts, 2)  # warm-up
        j_total, h_total = best(jax_run, prompts, args.new_tokens), best(hf_run, prompts, args.new_tokens)
        j_ttft, h_ttft = best(jax_run, prompts, 1), best(hf_run, prompts, 1)
        j_tps, h_tps = batch * args.new_tokens / j_total, batch * args.new_tokens / h_total
        rows.append((batch, j_tps, h_tps, j_ttft * 1e3, h_ttft * 1e3, compile_s, agreement))
    print(f"\n{'batch':>5} {'jaxllm tok/s':>13} {'HF tok/s':>9} {'ratio':>6} {'jaxllm TTFT ms':>15} "
          f"{'HF TTFT ms':>11} {'ratio':>6} {'jaxllm compile s':>17} {'same tokens':>12}")
    for batch, jt, ht, jf, hf, comp, agree in rows:
        print(f"{batch:>5} {jt:>13.1f} {ht:>9.1f} {jt / ht:>6.2f} {jf:>15.1f} {hf:>11.1f} {hf / jf:>6.2f} "
              f"{comp:>17.1f} {agree:>12.0%}")
    print("\nratio > 1 means jaxllm is faster (throughput: jaxllm/HF; TTFT: HF/jaxllm).")


if __name__ == "__main__":
    main()
