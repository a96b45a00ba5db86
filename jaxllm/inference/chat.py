"""`jaxllm chat --checkpoint DIR`: an interactive chat with the family's template, streaming tokens.

Commands: /reset clears the history, /exit (or Ctrl-D) quits. The oldest turns are dropped when the
conversation no longer fits the context. A reply ends at a stop token or at a --stop string."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Iterable, Iterator, Sequence

from jaxllm.inference.generate_cli import add_sampling_args, sampling_from_args
from jaxllm.inference.stops import check_stop_strings, find_stop, held_back


def fit_history(template, tok, messages, budget: int):
    """Drop the oldest user/assistant pairs (keeping a system message) until the prompt fits."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    while True:
        ids = template.prompt(tok, system + turns)
        if len(ids) <= budget or len(turns) <= 1:
            return ids[-budget:], system + turns
        turns = turns[2:]


class ChatSession:
    """The conversation behind `jaxllm chat`: history, fitting it into the context, and one streamed
    reply per user message. `respond(prompt_ids)` yields the model's new token ids."""

    def __init__(self, template, tok, respond: Callable[[list[int]], Iterable[int]], budget: int, *,
                 system: str | None = None, stop_strings: Sequence[str] = ()):
        self.template, self.tok, self.respond, self.budget = template, tok, respond, budget
        self.stop_ids = set(template.stop_ids(tok))
        self.stop_strings = check_stop_strings(stop_strings)
        self.system = [{"role": "system", "content": system}] if system else []
        self.history = list(self.system)
        self.last_reply = ""

    def reset(self) -> None:
        self.history = list(self.system)

    def reply(self, text: str) -> Iterator[str]:
        """Yield the reply's text as it is decoded; it ends before a stop string, and no text that may
        begin one is shown early. An empty reply is not kept (templates refuse empty turns), nor is
        the message it answered."""
        prompt, messages = fit_history(self.template, self.tok, self.history + [{"role": "user", "content": text}],
                                       self.budget)
        ids: list[int] = []
        reply = shown = ""
        for token in self.respond(prompt):
            if token in self.stop_ids:
                break
            ids.append(token)
            reply = self.tok.decode(ids)
            cut = find_stop(reply, self.stop_strings)
            if cut is not None:
                reply = reply[:cut]
                break  # consume no more tokens: generation ends here
            visible = reply[:len(reply) - held_back(reply, self.stop_strings)]
            if len(visible) > len(shown) and not visible.endswith("\ufffd"):  # wait for whole characters
                yield visible[len(shown):]
                shown = visible
        if len(reply) > len(shown):
            yield reply[len(shown):]
        self.last_reply = reply
        self.history = messages + [{"role": "assistant", "content": reply}] if reply.strip() else messages[:-1]


def _keys(rng):
    """A fresh sampling key per reply."""
    import jax

    while True:
        rng, key = jax.random.split(rng)
        yield key


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="jaxllm chat", description=__doc__)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--adapter", metavar="DIR", help="a LoRA adapter to run on top of the checkpoint (a LoRA "
                        "run, or a PEFT adapter directory)")
    parser.add_argument("--system", help="system prompt")
    add_sampling_args(parser)
    args = parser.parse_args(argv)

    import jax

    from jaxllm.checkpoint import CheckpointError
    from jaxllm.convert.readers import ConversionError
    from jaxllm.inference.generate import stream
    from jaxllm.inference.loading import load_model, serving_mesh
    from jaxllm.models import decoding_layout
    from jaxllm.tokenizer import TokenizerError, get_chat_template, template_for_family

    try:
        mesh = serving_mesh(args.mesh)
        config, params, tok = load_model(args.checkpoint, dtype=args.dtype, tokenizer=args.tokenizer, mesh=mesh,
                                         adapter=args.adapter)
        params = decoding_layout(params)  # once, not per call (CPU: one subtree per layer)
        if tok is None:
            raise ValueError(f"{args.checkpoint}: no tokenizer.model stored with it; pass --tokenizer")
        sampling = sampling_from_args(args, config.family)
        template = get_chat_template(template_for_family(config.family))
        template.prompt(tok, [{"role": "user", "content": "hi"}])  # a tokenizer the template rejects fails now
        keys = _keys(jax.random.key(args.seed))

        def respond(prompt):
            return stream(config, params, prompt, sampling, next(keys), stop_ids=template.stop_ids(tok), mesh=mesh,
                          vocab_limit=tok.vocab_size)

        budget = max(16, config.max_position_embeddings - sampling.max_new_tokens)
        session = ChatSession(template, tok, respond, budget, system=args.system, stop_strings=args.stop)
    except (ValueError, CheckpointError, ConversionError, TokenizerError) as err:
        print(f"jaxllm chat: error: {err}", file=sys.stderr)
        return 2
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
            session.reset()
            print("(history cleared)", flush=True)
            continue
        print("assistant> ", end="", flush=True)
        try:
            for piece in session.reply(text):
                print(piece, end="", flush=True)
        except TokenizerError as err:  # a message the template refuses (e.g. Llama 2's [INST] tags)
            print(f"(not sent: {err})", flush=True)
            continue
        print(flush=True)
        if not session.last_reply.strip():
            print("(empty reply: this exchange is not kept in the history)", flush=True)
