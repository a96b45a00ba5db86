"""`jaxllm chat --checkpoint DIR`: an interactive chat with the family's template, streaming tokens.

Commands: /reset clears the history, /exit (or Ctrl-D) quits. The oldest turns are dropped when the
conversation no longer fits the context."""
from __future__ import annotations

import argparse
import sys

from jaxllm.inference.generate_cli import add_sampling_args, sampling_from_args


def fit_history(template, tok, messages, budget: int):
    """Drop the oldest user/assistant pairs (keeping a system message) until the prompt fits."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    while True:
        ids = template.prompt(tok, system + turns)
        if len(ids) <= budget or len(turns) <= 1:
            return ids[-budget:], system + turns
        turns = turns[2:]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="jaxllm chat", description=__doc__)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--system", help="system prompt")
    add_sampling_args(parser)
    args = parser.parse_args(argv)

    import jax

    from jaxllm.checkpoint import CheckpointError
    from jaxllm.convert.readers import ConversionError
    from jaxllm.inference.generate import stream
    from jaxllm.inference.loading import load_model
    from jaxllm.tokenizer import TokenizerError, get_chat_template, template_for_family

    try:
        config, params, tok = load_model(args.checkpoint, dtype=args.dtype, tokenizer=args.tokenizer)
        if tok is None:
            raise ValueError(f"{args.checkpoint}: no tokenizer.model stored with it; pass --tokenizer")
    except (ValueError, CheckpointError, ConversionError, TokenizerError) as err:
        print(f"jaxllm chat: error: {err}", file=sys.stderr)
        return 2
    sampling = sampling_from_args(args, config.family)
    template = get_chat_template(template_for_family(config.family))
    stop_ids = template.stop_ids(tok)
    budget = max(16, config.max_position_embeddings - sampling.max_new_tokens)
    history = [{"role": "system", "content": args.system}] if args.system else []
    rng = jax.random.key(args.seed)
    print(f"jaxllm chat — {config.name} ({config.family}, template {template.name}). /reset, /exit.", flush=True)
    while True:
        try:
            line = input("user> ")
        except EOFError:
            print()
            return 0
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            return 0
        if text == "/reset":
            history = history[:1] if args.system else []
            print("(history cleared)", flush=True)
            continue
        history.append({"role": "user", "content": text})
        prompt, history = fit_history(template, tok, history, budget)
        rng, key = jax.random.split(rng)
        print("assistant> ", end="", flush=True)
        ids: list[int] = []
        shown = ""
        for token in stream(config, params, prompt, sampling, key, stop_ids=stop_ids):
            if token in stop_ids:
                break
            ids.append(token)
            decoded = tok.decode(ids)
            if not decoded.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                print(decoded[len(shown):], end="", flush=True)
                shown = decoded
        print(flush=True)
        history.append({"role": "assistant", "content": tok.decode(ids) or " "})
