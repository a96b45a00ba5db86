"""`train.final_eval`: what `jaxllm train` reports after a finished run — the perplexity on the sources'
held-out slices (`data.sources.N.holdout`: documents training never read) and greedy samples of a few
prompts (`repetition_penalty`: HF's, on the greedy logits; a model of a few minutes' training repeats itself
under plain greedy decoding). Printed, and written as metrics.jsonl's last record {"step", "final_eval": true, ...} (a rerun of the
finished run replaces it)."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

DEFAULT_MAX_NEW_TOKENS = 48


def final_eval(config, params, step: int, run_dir: str | Path, log=print) -> dict:
    """Score and sample `params` (host or single-device arrays) as `config.train.final_eval` asks; returns
    the record appended to RUN/metrics.jsonl."""
    import jax

    from jaxllm.data.files import resolve_path
    from jaxllm.data.pipeline import heldout_texts
    from jaxllm.eval.scoring import perplexity
    from jaxllm.inference.generate import generate
    from jaxllm.inference.sampling import SamplingParams
    from jaxllm.models import decoding_layout
    from jaxllm.tokenizer import Tokenizer

    spec = config.train.final_eval or {}
    model = config.base_model
    params = jax.device_put(jax.device_get(params))  # off the training mesh, onto one device
    record: dict = {"step": step, "final_eval": True}
    if spec.get("heldout") and not any(s.holdout for s in config.data.sources):
        log("held-out perplexity: none (no held-out slice: set data.sources.N.holdout, the last N documents "
            "of that source, never trained on)")
    elif spec.get("heldout"):
        # scored as training saw the text: the data section's BOS convention
        tok = Tokenizer.load(resolve_path(config.data.tokenizer))
        tok.add_bos = config.data.add_bos
        texts = heldout_texts(config.data)
        parts, total_nll, total_tokens = [], 0.0, 0
        for name, docs in texts.items():
            result = perplexity(model, params, tok, docs, seq_len=config.data.seq_len)
            record[f"heldout/{name}/perplexity"] = result["perplexity"]
            record[f"heldout/{name}/tokens"] = result["tokens"]
            parts.append(f"{name} {result['perplexity']:.1f} ({len(docs)} docs, {result['tokens']:,} tokens)")
            total_nll += result["nll"] * result["tokens"]
            total_tokens += result["tokens"]
        record["heldout/perplexity"] = math.exp(total_nll / total_tokens)
        record["heldout/tokens"] = total_tokens
        log(f"held-out perplexity {record['heldout/perplexity']:.1f}: {', '.join(parts)}; the sources' last "
            f"documents, never trained on")
    prompts = spec.get("prompts") or []
    if prompts:
        # encoded as `jaxllm generate` encodes them (the family's BOS default), so its greedy output matches
        tok = Tokenizer.load(resolve_path(config.data.tokenizer), family=model.family)
        penalty = float(spec.get("repetition_penalty", 1.0))
        sampling = SamplingParams(temperature=0.0, repetition_penalty=penalty,
                                  max_new_tokens=int(spec.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)))
        result = generate(model, decoding_layout(params), [tok.encode(p, bos=tok.add_bos) for p in prompts],
                          sampling, jax.random.key(0), stop_ids=[tok.eos_id], pad_id=tok.pad_id,
                          vocab_limit=tok.vocab_size)
        samples, label = [], f" (repetition penalty {penalty:g})" if penalty != 1 else ""
        for prompt, ids in zip(prompts, result.tokens):
            text = tok.decode([i for i in ids if i != tok.eos_id])
            samples.append({"prompt": prompt, "completion": text})
            log(f"greedy sample{label}: {prompt}{text}".rstrip())
        record["samples"] = samples
    record["time"] = round(time.time(), 3)
    path = Path(run_dir) / "metrics.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    kept = [line for line in lines if '"final_eval": true' not in line]  # a rerun of a finished run: one report
    kept.append(json.dumps(record, ensure_ascii=False))
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    return record
