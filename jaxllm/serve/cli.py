"""`jaxllm serve --checkpoint DIR`: an OpenAI-compatible HTTP server with continuous batching.

Endpoints: POST /v1/chat/completions (the family's chat template), POST /v1/completions, GET /v1/models,
GET /health. Streaming (server-sent events) or not; max_tokens, temperature, top_p, top_k, stop, seed,
n, and repetition_penalty / ignore_eos as in vLLM. What a request leaves out comes from the family's
generation defaults (as `jaxllm generate`); chat's max_tokens defaults to what fits the context.

--slots requests decode together; more wait in a queue (up to --max-requests in all, then 503). Every
program is compiled before the port opens (one prefill per prompt-length bucket, one decode step).
Binds to 127.0.0.1 unless --host says otherwise; --api-key (or JAXLLM_API_KEY) requires
`Authorization: Bearer KEY`. SIGINT/SIGTERM stop accepting connections and finish the requests in
flight before exiting. --port 0 picks a free port (printed).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import socket
import sys
import time
from pathlib import Path


def _args(argv):
    parser = argparse.ArgumentParser(prog="jaxllm serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="jaxllm checkpoint, training run (a LoRA run: on its "
                        "recorded base) or HF directory")
    parser.add_argument("--adapter", metavar="DIR", help="a LoRA adapter to run on top of the checkpoint (a LoRA "
                        "run, or a PEFT adapter directory)")
    parser.add_argument("--tokenizer", help="tokenizer.model (default: the one stored with the checkpoint)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype")
    parser.add_argument("--mesh", default="auto", help="'auto' (tensor-parallel over all devices), 'none' (one "
                        "device) or DATA,FSDP,TENSOR sizes; slots are split over DATA x FSDP")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="0: any free port")
    parser.add_argument("--model-name", help="the model's id in the API (default: the checkpoint directory's name)")
    parser.add_argument("--slots", type=int, default=8, help="requests decoded together")
    parser.add_argument("--max-len", type=int, help="tokens per slot, prompt and reply "
                        "(default: the model's context, at most 4096)")
    parser.add_argument("--max-prompt-tokens", type=int, help="longest prompt (default: max-len - 1)")
    parser.add_argument("--max-tokens", type=int, default=2048, help="new tokens per request at most")
    parser.add_argument("--max-requests", type=int, default=64, help="requests running or waiting; then 503")
    parser.add_argument("--max-request-bytes", type=int, default=1 << 20, help="largest request body (413 past it)")
    parser.add_argument("--request-timeout", type=float, default=600.0, help="seconds from arrival to the last "
                        "token (0: none)")
    parser.add_argument("--api-key", default=os.environ.get("JAXLLM_API_KEY"),
                        help="require this bearer token (default: $JAXLLM_API_KEY; none: open)")
    parser.add_argument("--decode-steps", type=int, default=1, help="decode steps per device call (more: fewer "
                        "host round trips, later joins)")
    parser.add_argument("--profile", metavar="DIR", help="trace the server from the opened port to shutdown with "
                                                         "jax.profiler into DIR (tensorboard --logdir DIR)")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return parser.parse_args(argv)


def _check(args) -> None:
    for name in ("slots", "max_tokens", "max_requests", "max_request_bytes", "decode_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    if args.request_timeout < 0:
        raise ValueError(f"--request-timeout must be >= 0, got {args.request_timeout:g}")
    if args.api_key is not None and not args.api_key.strip():
        raise ValueError("--api-key is empty")


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, made before the model loads, so a taken port fails at once."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as err:
        raise ValueError(f"--host {host}: cannot resolve it ({err.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {err.strerror}") from None
    sock.listen(2048)
    return sock


def main(argv: list[str]) -> int:
    args = _args(argv)
    from jaxllm.checkpoint import CheckpointError
    from jaxllm.convert.readers import ConversionError
    from jaxllm.tokenizer import TokenizerError

    sock = None
    try:
        _check(args)
        sock = _bind(args.host, args.port)
        import jax

        from jaxllm.inference.engine import Engine, prefill_buckets
        from jaxllm.inference.loading import load_model, serving_mesh
        from jaxllm.serve.app import Limits, Service, create_app

        mesh = serving_mesh(args.mesh)
        config, params, tok = load_model(args.checkpoint, dtype=args.dtype, tokenizer=args.tokenizer, mesh=mesh,
                                         adapter=args.adapter)
        if tok is None:
            raise ValueError(f"{args.checkpoint}: no tokenizer.model stored with it; pass --tokenizer")
        max_len = args.max_len or min(config.max_position_embeddings, 4096)
        max_prompt = args.max_prompt_tokens or max_len - 1
        if not 1 <= max_prompt < max_len:
            raise ValueError(f"--max-prompt-tokens must be in [1, {max_len - 1}] (below --max-len), got {max_prompt}")
        start = time.perf_counter()
        print(f"jaxllm serve: compiling for {args.slots} slots of {max_len} tokens, prompts up to {max_prompt} "
              f"(buckets {', '.join(map(str, prefill_buckets(max_prompt)))})…", flush=True)
        engine = Engine(config, params, slots=args.slots, max_len=max_len, mesh=mesh, vocab_limit=tok.vocab_size,
                        buckets=prefill_buckets(max_prompt), decode_steps=args.decode_steps,
                        max_stop_ids=max(4, len(_stop_ids(config, tok))))
        del params  # the engine holds its own layout of them (on CPU: one copy per layer)
        limits = Limits(max_tokens=args.max_tokens, max_requests=args.max_requests,
                        max_request_bytes=args.max_request_bytes, request_timeout=args.request_timeout or None,
                        api_key=args.api_key)
        name = args.model_name or Path(args.checkpoint).resolve().name
        app = create_app(Service(engine, config, tok, model_name=name, limits=limits))
    except (ValueError, CheckpointError, ConversionError, TokenizerError) as err:
        if sock is not None:
            sock.close()
        print(f"jaxllm serve: error: {err}", file=sys.stderr)
        return 2
    import uvicorn

    host, port = sock.getsockname()[:2]
    devices = jax.devices()
    print(f"jaxllm serve: {name} ({config.family}) on {len(devices)} {devices[0].platform} device(s), "
          f"KV cache {engine.cache_bytes() / 2**20:.1f} MiB, compiled in {time.perf_counter() - start:.1f} s",
          flush=True)
    if args.api_key is None and host not in ("127.0.0.1", "::1", "localhost"):
        print(f"jaxllm serve: warning: listening on {host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr, flush=True)
    print(f"jaxllm serve: listening on http://{host if ':' not in host else f'[{host}]'}:{port}", flush=True)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(name)s: %(message)s")
    server = _server_class(uvicorn)(uvicorn.Config(app, log_level=args.log_level, lifespan="on",
                                                   timeout_graceful_shutdown=None))
    from jaxllm.train.profile import trace
    with trace(args.profile):
        server.run(sockets=[sock])
    print("jaxllm serve: stopped" + (f"; profile written to {args.profile}" if args.profile else ""), flush=True)
    return 0


def _server_class(uvicorn):
    class Server(uvicorn.Server):
        """uvicorn's server, except that the SIGINT/SIGTERM which asked for the graceful shutdown is not
        raised again once it is done (uvicorn re-raises it): the shutdown answered it, so we exit 0."""

        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                yield
                getattr(self, "_captured_signals", []).clear()

    return Server


def _stop_ids(config, tok) -> list[int]:
    from jaxllm.tokenizer import get_chat_template, template_for_family

    return get_chat_template(template_for_family(config.family)).stop_ids(tok)
