"""Serving: `jaxllm serve` (continuous batching) against sequential `generate`, a static batch of
`generate`, and `transformers.generate` at the same batch, on the same requests and weights.

Each concurrency level C runs R requests (default 8 C, 16 to 128): a random prompt of --prompt-len tokens
and its own number of new tokens, drawn uniformly from [--min-new, --max-new] (greedy, EOS ignored), so
requests end at different times as real replies do. C clients take the requests in order from one list, each sending
the next as soon as its last one is answered, over HTTP to a `jaxllm serve --slots C` process. The
references process the same requests in the same order: sequentially (batch 1; with C requests in the
system at a time, a request waits for those ahead of it) and in static batches of C (a batch runs until
its longest request is done, and its requests' latency is the batch's). Throughput counts each request's
own new tokens; latency is from a request's submission to its last token. The implementations take
turns, --rounds times, and each one's fastest round is reported.

    python bench/serve.py                 # ~60M-parameter Llama (as bench/decode.py), CPU, ~30 minutes
    python bench/serve.py --levels 1 8 32 --requests 64 --hidden 1024 --layers 12 --dtype bfloat16   # a GPU
"""
from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def percentile(values, q):
    return float(np.percentile(np.asarray(values), q))


def start_server(checkpoint: Path, slots: int, max_len: int, prompt_len: int, dtype: str):
    command = [sys.executable, "-m", "jaxllm.cli", "serve", "--checkpoint", str(checkpoint), "--port", "0",
               "--slots", str(slots), "--max-len", str(max_len), "--max-prompt-tokens", str(prompt_len),
               "--max-requests", str(4 * slots + 8), "--mesh", "none", "--model-name", "bench", "--dtype", dtype,
               "--log-level", "warning"]
    log = tempfile.TemporaryFile("w+")  # stderr to a file, stdout read on: a full pipe would stall the server
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    while True:
        line = proc.stdout.readline()
        if not line:
            log.seek(0)
            raise RuntimeError(f"jaxllm serve did not start:\n{log.read()[-3000:]}")
        if "listening on " in line:
            threading.Thread(target=lambda: proc.stdout.read(), daemon=True).start()
            return proc, line.split("listening on ")[1].strip()


async def drive(url: str, requests, clients: int):
    """Closed loop: `clients` tasks taking the requests in order, each sending the next one as soon as its
    last is answered. Returns (wall seconds, latencies, completion texts in request order, new tokens)."""
    import httpx

    texts, latencies, tokens = [None] * len(requests), [None] * len(requests), [0] * len(requests)
    queue = iter(range(len(requests)))

    async def client(http):
        for i in queue:
            prompt, new = requests[i]
            start = time.perf_counter()
            reply = await http.post(url + "/v1/completions", json={
                "model": "bench", "prompt": prompt, "max_tokens": new, "temperature": 0, "ignore_eos": True})
            reply.raise_for_status()
            body = reply.json()
            latencies[i] = time.perf_counter() - start
            texts[i], tokens[i] = body["choices"][0]["text"], body["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=3600, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        return time.perf_counter() - start, latencies, texts, tokens


def sequential_latencies(service, clients: int):
    """Latencies when one server handles the requests in turn for `clients` closed-loop clients: request i
    is submitted when request i - clients completes and waits for those ahead of it."""
    finish = np.cumsum(service)
    return [finish[i] - (finish[i - clients] if i >= clients else 0.0) for i in range(len(service))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32], help="concurrent clients")
    parser.add_argument("--requests", type=int, default=0, help="requests per level (default: 8 per client, 16 to 128)")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--min-new", type=int, default=16)
    parser.add_argument("--max-new", type=int, default=128)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--rounds", type=int, default=2, help="each implementation runs this many times, taking "
                        "turns; the fastest counts (a shared machine's load comes and goes)")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import torch
    import transformers

    from jaxllm.checkpoint import save_params
    from jaxllm.convert.mapping import hf_to_params
    from jaxllm.inference import SamplingParams, bucket, generate
    from jaxllm.inference.detokenize import TextStream
    from jaxllm.models import count_params, decoding_layout, get_preset
    from jaxllm.tokenizer import Tokenizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count())
    max_len = args.prompt_len + args.max_new
    cfg = get_preset("llama2-7b", hidden_size=args.hidden, intermediate_size=int(args.hidden * 8 / 3 // 64 * 64),
                     num_layers=args.layers, num_heads=args.heads, vocab_size=32000, max_position_embeddings=max_len,
                     dtype=args.dtype, param_dtype=args.dtype)
    hf_cfg = transformers.LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                                      intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                                      num_attention_heads=cfg.num_heads, max_position_embeddings=max_len,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    host = hf_to_params({k: v.numpy() for k, v in model.state_dict().items()}.__getitem__, cfg)
    params = jax.tree.map(lambda x: jnp.asarray(x, args.dtype), host)
    params = decoding_layout(params)  # once for the `generate` references, as the server does at start
    model = model.to(device=device, dtype=getattr(torch, args.dtype))
    tok = Tokenizer.load(ROOT / "tests" / "data" / "llama2-32k.model")  # Llama 2's own 32,000 pieces
    scratch = Path(tempfile.mkdtemp(prefix="jaxllm-bench-serve-"))
    checkpoint = scratch / "bench"
    save_params(checkpoint, host, cfg)
    (checkpoint / "tokenizer.model").write_bytes(tok.path.read_bytes())
    print(f"model: {count_params(cfg) / 1e6:.1f}M parameters, {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
          f"{args.dtype}; prompt {args.prompt_len} tokens, {args.min_new}-{args.max_new} new tokens per request, "
          f"greedy; jaxllm on {jax.devices()[0].platform}, transformers on {device.type}", flush=True)

    def jax_batch(prompts, new):
        return generate(cfg, params, prompts, SamplingParams(temperature=0.0, max_new_tokens=new)).tokens

    def hf_batch(prompts, new):
        with torch.no_grad():
            model.generate(torch.tensor(prompts, device=device), max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, eos_token_id=None, pad_token_id=0)
        if device.type == "cuda":
            torch.cuda.synchronize()

    def server_text(prompt, ids):
        """The server's text for these new ids (it decodes a completion as the continuation of its prompt)."""
        stream = TextStream(tok.decode, context=prompt[-8:])
        return "".join(stream.add(i) for i in ids) + stream.finish()

    def static(run, requests, batch):
        """Static batches in request order; each request's latency is its batch's time."""
        latencies, start = [], time.perf_counter()
        for first in range(0, len(requests), batch):
            group = requests[first:first + batch]
            t = time.perf_counter()
            run([p for p, _ in group], max(n for _, n in group))
            latencies += [time.perf_counter() - t] * len(group)
        return time.perf_counter() - start, latencies

    rng = np.random.default_rng(0)
    rows = []
    try:
        for clients in args.levels:
            count = args.requests or min(128, max(16, 8 * clients))
            requests = [(rng.integers(3, cfg.vocab_size, args.prompt_len).tolist(),
                         int(rng.integers(args.min_new, args.max_new + 1))) for _ in range(count)]
            useful = sum(n for _, n in requests)
            proc, url = start_server(checkpoint, clients, max_len, args.prompt_len, args.dtype)
            try:
                asyncio.run(drive(url, requests[:clients], clients))  # warm-up: connections, first requests
                # the references, warmed up on their shapes first (compilation excluded, as for the server):
                # generate compiles per batch size and per power-of-two bucket of new tokens
                for batch in sorted({1, clients}):
                    for room in sorted({bucket(n) for _, n in requests}):
                        jax_batch([requests[0][0]] * batch, room)
                hf_batch([requests[0][0]], 2)
                best = {}  # name -> (seconds, latencies): the fastest of the rounds, which take turns in time

                def keep(name, seconds, latencies):
                    if name not in best or seconds < best[name][0]:
                        best[name] = (seconds, latencies)

                for _ in range(args.rounds):
                    wall, latencies, texts, tokens = asyncio.run(drive(url, requests, clients))
                    assert tokens == [n for _, n in requests], "the server did not generate the requested tokens"
                    keep("jaxllm serve (continuous)", wall, latencies)
                    service, seq_out = [], []
                    for prompt, new in requests:
                        t = time.perf_counter()
                        seq_out += jax_batch([prompt], new)
                        service.append(time.perf_counter() - t)
                    keep("generate, sequential", sum(service), sequential_latencies(service, clients))
                    if clients > 1:
                        keep("generate, static batch", *static(jax_batch, requests, clients))
                    keep("transformers, static batch", *static(hf_batch, requests, clients))
            finally:
                proc.terminate()
                proc.wait(60)
            same = np.mean([server_text(p, ids) == text for (p, _), ids, text in zip(requests, seq_out, texts)])
            level = [(name, *best[name]) for name in ("jaxllm serve (continuous)", "generate, sequential",
                                                      "generate, static batch", "transformers, static batch")
                     if name in best]
            reference = level[2][1] if clients > 1 else level[1][1]
            for name, seconds, lat in level:
                rows.append((clients, name, useful / seconds, percentile(lat, 50), percentile(lat, 99),
                             reference / seconds))
            print(f"  {clients} clients: {count} requests, {useful} new tokens; server text equals sequential "
                  f"generate's for {same:.0%} of requests", flush=True)
    finally:
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)

    print(f"\n{'clients':>7}  {'implementation':<28} {'tok/s':>8} {'p50 s':>7} {'p99 s':>7} {'vs static':>9}")
    for clients, name, tps, p50, p99, ratio in rows:
        print(f"{clients:>7}  {name:<28} {tps:>8.1f} {p50:>7.2f} {p99:>7.2f} {ratio:>8.2f}x")
    print("\n'vs static': throughput over static-batch generate at the same batch (sequential generate for "
          "1 client); > 1 is faster.")


if __name__ == "__main__":
    main()
