"""`jaxllm convert --from hf --to jaxllm SRC DST` | `--from jaxllm --to hf SRC DST` |
`jaxllm convert apply-delta --base LLAMA_13B_HF --delta ZIYA_DELTA_HF DST`.

SRC for `--from hf` is an HF directory (safetensors or pytorch_model*.bin, sharded or not) or Meta's
original `consolidated.*.pth` + `params.json`. The family is detected from config.json; force it with
--family. DST must not exist: it appears complete or not at all."""
from __future__ import annotations

import argparse
import sys
import time

from jaxllm.config import FAMILIES


def _size(text: str) -> int:
    units = {"KB": 2**10, "MB": 2**20, "GB": 2**30}
    for unit, factor in units.items():
        if text.upper().endswith(unit):
            return int(float(text[:-2]) * factor)
    return int(text)


def main(argv: list[str]) -> int:
    from jaxllm.checkpoint import CheckpointError
    from jaxllm.config import ConfigError
    from jaxllm.convert.core import apply_delta, hf_to_jaxllm, jaxllm_to_hf
    from jaxllm.convert.readers import ConversionError

    if argv and argv[0] == "apply-delta":
        parser = argparse.ArgumentParser(prog="jaxllm convert apply-delta",
                                         description="Merge Ziya's delta weights onto LLaMA-13B (HF layout).")
        parser.add_argument("--base", required=True, help="HF directory of the original LLaMA-13B")
        parser.add_argument("--delta", required=True, help="HF directory of the Ziya delta release")
        parser.add_argument("dst", help="HF directory to write")
        args = parser.parse_args(argv[1:])
        action = lambda: apply_delta(args.base, args.delta, args.dst)
    else:
        parser = argparse.ArgumentParser(prog="jaxllm convert", description=__doc__,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("--from", dest="src_kind", choices=("hf", "jaxllm"), required=True)
        parser.add_argument("--to", dest="dst_kind", choices=("hf", "jaxllm"), required=True)
        parser.add_argument("src")
        parser.add_argument("dst")
        parser.add_argument("--family", choices=FAMILIES, help="override family detection")
        parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="stored dtype")
        parser.add_argument("--max-shard-size", default="5GB", help="HF shard size (e.g. 2GB, 500MB)")
        args = parser.parse_args(argv)
        if (args.src_kind, args.dst_kind) == ("hf", "jaxllm"):
            action = lambda: hf_to_jaxllm(args.src, args.dst, family=args.family, dtype=args.dtype)
        elif (args.src_kind, args.dst_kind) == ("jaxllm", "hf"):
            action = lambda: jaxllm_to_hf(args.src, args.dst, dtype=args.dtype,
                                          max_shard_bytes=_size(args.max_shard_size))
        else:
            parser.error("--from and --to must differ (hf → jaxllm or jaxllm → hf)")
    start = time.perf_counter()
    try:
        result = action()
    except (ConversionError, CheckpointError, ConfigError) as err:
        print(f"jaxllm convert: error: {str(err).splitlines()[0] if str(err) else type(err).__name__}",
              file=sys.stderr)
        return 2
    except OSError as err:  # disk full, permissions: the destination is still absent
        print(f"jaxllm convert: error: {err.filename or args.dst}: {err.strerror or err}", file=sys.stderr)
        return 2
    what = f" ({result.family}, {result.num_layers} layers)" if result is not None else ""
    print(f"wrote {args.dst}{what} in {time.perf_counter() - start:.1f}s")
    return 0
