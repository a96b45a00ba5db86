"""`jaxllm` console script: each sub-command lives in its own module and is imported on demand,
so `jaxllm --help` does not pay for importing JAX."""
from __future__ import annotations

import errno
import importlib
import os
import sys

# command -> (module with `main(argv) -> int`, or "module:function", one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("jaxllm.train.cli", "pretrain (no arguments: the demo model on the shipped corpus)"),
    "sft": ("jaxllm.stages.cli:sft_main", "supervised fine-tuning on chat data (loss on assistant tokens)"),
    "dpo": ("jaxllm.stages.cli:dpo_main", "direct preference optimisation against the starting model"),
    "rm": ("jaxllm.stages.cli:rm_main", "train a reward model (Llama 2 margin ranking loss)"),
    "rejection-sample": ("jaxllm.rlhf.cli:rejection_main", "best-of-K sampling with a reward model → SFT data"),
    "ppo": ("jaxllm.rlhf.cli:ppo_main", "PPO with a KL penalty against the starting policy"),
    "data": ("jaxllm.stages.data_cli", "alignment data: Ghost Attention dialogues, easy-to-hard SFT curriculum"),
    "convert": ("jaxllm.convert.cli", "convert HuggingFace / PyTorch / Meta checkpoints to and from jaxllm"),
    "tokenizer": ("jaxllm.tokenizer.cli", "train, extend, inspect sentencepiece tokenizers"),
    "generate": ("jaxllm.inference.generate_cli", "sample text from a checkpoint (KV-cached)"),
    "chat": ("jaxllm.inference.chat", "interactive terminal chat with the family's chat template"),
    "serve": ("jaxllm.serve.cli", "OpenAI-compatible HTTP server with continuous batching"),
    "eval": ("jaxllm.eval.cli", "perplexity and multiple-choice (C-Eval / MMLU) evaluation"),
    "presets": ("jaxllm.models.cli", "list every model preset with its parameter count"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items())
    return ("usage: jaxllm COMMAND [ARGS...]\n\nJAX/Flax training, conversion and inference for "
            "Llama 2, Baichuan 1/2, CT-LLM and Ziya.\n\ncommands:\n" + rows +
            "\n\nStart with `jaxllm train`: it trains the demo model on the shipped corpus (CPU, minutes).\n"
            "Run `jaxllm COMMAND --help` for a command's options.")


class _PipeSafe:
    """stdout/stderr that survive the reader going away (`jaxllm train … | tee log`, then Ctrl-C kills tee
    too): the first write to a closed pipe points the descriptor at /dev/null, so the command goes on (a
    training run still saves) and exits with its own status instead of dying on BrokenPipeError."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        try:
            return self._stream.write(text)
        except OSError as err:
            self._drop(err)
            return len(text)

    def flush(self):
        try:
            self._stream.flush()
        except OSError as err:
            self._drop(err)

    def _drop(self, err: OSError) -> None:
        if err.errno not in (errno.EPIPE, errno.EINVAL) and not isinstance(err, BrokenPipeError):
            raise err
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())
        os.close(devnull)
        try:
            self._stream.flush()  # what was buffered goes to /dev/null now
        except OSError:
            pass

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _survive_closed_pipes() -> None:
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if not isinstance(stream, _PipeSafe) and hasattr(stream, "fileno"):
            try:
                stream.fileno()
            except (OSError, ValueError):  # not a real descriptor (e.g. captured by a test runner)
                continue
            setattr(sys, name, _PipeSafe(stream))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        from jaxllm.config import closest
        print(f"jaxllm: unknown command '{name}'{closest(name, COMMANDS)}\n\n{_usage()}", file=sys.stderr)
        return 2
    from jaxllm.preflight.topology import hide_absent_tpu
    from jaxllm.xla_flags import apply_gpu_flags
    apply_gpu_flags()  # before any sub-command imports JAX
    _survive_closed_pipes()
    hide_absent_tpu()
    module_name, _, function = COMMANDS[name][0].partition(":")
    entry = getattr(importlib.import_module(module_name), function or "main")
    try:
        return int(entry(rest) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # a pipe written to some other way: not a success
        return 128 + 13  # as if killed by SIGPIPE
    except Exception as err:  # a directory another process holds (`train.rundir.lock`): one line, any command
        from jaxllm.train.rundir import RunDirLocked
        if not isinstance(err, RunDirLocked):
            raise
        print(f"jaxllm {name}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
