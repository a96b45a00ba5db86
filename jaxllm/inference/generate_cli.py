"""`jaxllm generate --checkpoint DIR --prompt TEXT` (or --prompts-file FILE --output OUT.jsonl).

DIR is a jaxllm checkpoint, a training run directory, or an HF directory (converted on the fly); --adapter
adds a LoRA adapter on top (a LoRA run directory alone runs on the base it recorded).
Sampling defaults come from the model family (Baichuan 2: temperature 0.3, top-k 5, top-p 0.85,
repetition penalty 1.05); flags override them. --chat wraps each prompt in the family's chat template.
A plain prompt starts with BOS as the checkpoint's tokenizer_config.json says (add_bos_token), else
as the family does (Baichuan 2: no BOS; the others: BOS). Added tokens (Ziya's <human>, <bot>) are single
ids in prompts and can be generated. Generation ends at a stop string (--stop); ids the tokenizer has
no piece or added token for (padded embedding rows) are never sampled. Parameters are split over all
devices (--mesh)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--temperature", type=float, help="0 = greedy")
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--repetition-penalty", type=float)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype")
    parser.add_argument("--tokenizer", help="tokenizer.model (default: the one stored with the checkpoint)")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable): the reply ends "
                        "before it")
    parser.add_argument("--mesh", default="auto", help="'auto' (tensor-parallel over all devices), 'none' (one "
                        "device) or DATA,FSDP,TENSOR sizes")


def sampling_from_args(args, family: str):
    from jaxllm.inference.sampling import FAMILY_DEFAULTS, SamplingParams

    base = FAMILY_DEFAULTS.get(family, SamplingParams())
    changes = {k: v for k, v in dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                     top_k=args.top_k, top_p=args.top_p,
                                     repetition_penalty=args.repetition_penalty).items() if v is not None}
    return dataclasses.replace(base, **changes)


def read_prompts(path: str) -> list[str]:
    """A .jsonl file of {"prompt": ...} records, or a text file with one prompt per line."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"{path}: no such prompts file")
    prompts = []
    for number, line in enumerate(file.read_text("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if file.suffix in (".jsonl", ".json"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: bad JSON: {err.msg}") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise ValueError(f"{path}:{number}: expected {{\"prompt\": \"...\"}}")
            prompts.append(record["prompt"])
        else:
            prompts.append(line)
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="jaxllm generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--adapter", metavar="DIR", help="a LoRA adapter to run on top of the checkpoint (a LoRA "
                        "run, or a PEFT adapter directory)")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--prompts-file", help="text (one per line) or jsonl with a 'prompt' field")
    parser.add_argument("--output", help="write {prompt, completion, tokens} jsonl here")
    parser.add_argument("--chat", action="store_true", help="apply the family's chat template")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--profile", metavar="DIR", help="write a jax.profiler trace of the generation to DIR "
                                                         "(tensorboard --logdir DIR: Profile tab)")
    add_sampling_args(parser)
    args = parser.parse_args(argv)

    import jax

    from jaxllm.checkpoint import CheckpointError
    from jaxllm.convert.readers import ConversionError
    from jaxllm.inference.generate import generate
    from jaxllm.inference.loading import load_model, serving_mesh
    from jaxllm.models import decoding_layout
    from jaxllm.inference.stops import check_stop_strings, find_stop
    from jaxllm.tokenizer import TokenizerError, get_chat_template, template_for_family

    try:
        prompts = list(args.prompt) + (read_prompts(args.prompts_file) if args.prompts_file else [])
        if not prompts:
            raise ValueError("give --prompt TEXT or --prompts-file FILE")
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        stops = check_stop_strings(args.stop)
        mesh = serving_mesh(args.mesh)
        config, params, tok = load_model(args.checkpoint, dtype=args.dtype, tokenizer=args.tokenizer, mesh=mesh,
                                         adapter=args.adapter)
        params = decoding_layout(params)  # once, not per call (CPU: one subtree per layer)
        if tok is None:
            raise ValueError(f"{args.checkpoint}: no tokenizer.model stored with it; pass --tokenizer")
        sampling = sampling_from_args(args, config.family)
        template = get_chat_template(template_for_family(config.family))
        encode = ((lambda p: template.prompt(tok, [{"role": "user", "content": p}])) if args.chat
                  else (lambda p: tok.encode(p, bos=tok.add_bos)))  # the checkpoint's add_bos_token, else the family's
        encoded = [encode(p) for p in prompts]  # a prompt the template refuses fails before any work
        stop_ids = template.stop_ids(tok) if args.chat else [tok.eos_id]
    except (ValueError, CheckpointError, ConversionError, TokenizerError) as err:
        print(f"jaxllm generate: error: {err}", file=sys.stderr)
        return 2
    out = open(args.output, "w", encoding="utf-8") if args.output else None
    rng = jax.random.key(args.seed)
    from jaxllm.train.profile import trace

    try:
        with trace(args.profile):
            for start in range(0, len(prompts), args.batch_size):
                chunk = prompts[start:start + args.batch_size]
                rng, key = jax.random.split(rng)
                result = generate(config, params, encoded[start:start + args.batch_size], sampling, key,
                                  stop_ids=stop_ids, pad_id=tok.pad_id, mesh=mesh, stop_strings=stops,
                                  decode=tok.decode, vocab_limit=tok.vocab_size)
                for prompt, ids in zip(chunk, result.tokens):
                    text = tok.decode([i for i in ids if i not in stop_ids])
                    cut = find_stop(text, stops)
                    text = text if cut is None else text[:cut]
                    if out:
                        out.write(json.dumps({"prompt": prompt, "completion": text, "tokens": len(ids)},
                                             ensure_ascii=False) + "\n")
                    else:
                        print(f"{prompt}{text}\n")
    finally:
        if out:
            out.close()
    if out:
        print(f"wrote {len(prompts)} completions to {args.output}")
    if args.profile:
        print(f"profile written to {args.profile} (tensorboard --logdir {args.profile})")
    return 0
