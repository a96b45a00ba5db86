"""`jaxllm convert --from hf --to jaxllm SRC DST` | `--from jaxllm --to hf SRC DST` |
`jaxllm convert apply-delta --base LLAMA_13B_HF --delta ZIYA_DELTA_HF DST`.

SRC for `--from hf` is an HF directory (safetensors or pytorch_model*.bin, sharded or not) or Meta's
original `consolidated.*.pth` + `params.json` (its tokenizer.model is taken from the parent folder, where
Meta keeps it, or from --tokenizer). The family is detected from config.json; force it with --family.
A Baichuan checkpoint's position encoding follows the modeling code it ships; that code and `auto_map`
are kept and written back on export. Each such decision is printed. DST must not exist: it appears
complete or not at all.

LoRA adapters (SRC a LoRA run, a jaxllm adapter or a PEFT adapter directory):
  --from jaxllm --to hf RUN DST --adapter          a PEFT adapter (adapter_config.json + adapter_model.safetensors;
                                                   --base-name NAME: its base_model_name_or_path; a reward
                                                   model's run: a SEQ_CLS adapter with the head as `score`)
  --from hf --to jaxllm PEFT DST --adapter --base B a jaxllm adapter of the jaxllm checkpoint B
  --from jaxllm|hf --to hf|jaxllm SRC DST --merge   the base with the adapter merged in (base: recorded, or --base)"""
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
    from jaxllm.convert.core import HF_ARCHS, apply_delta, hf_to_jaxllm, jaxllm_to_hf
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
        parser.add_argument("--tokenizer", help="hf → jaxllm: the tokenizer.model to keep with the checkpoint "
                            "(default: beside the weights; for Meta's release, its parent folder)")
        parser.add_argument("--hf-arch", choices=HF_ARCHS, default="native",
                            help="jaxllm → hf: 'llama' writes a RoPE Baichuan model as a stock LlamaForCausalLM "
                            "(W_pack split into q/k/v, NormHead rows normalised), loadable without remote code")
        lora = parser.add_mutually_exclusive_group()
        lora.add_argument("--adapter", action="store_true", help="convert a LoRA adapter (jaxllm ⇄ PEFT format)")
        lora.add_argument("--merge", action="store_true", help="merge a LoRA adapter into its base")
        parser.add_argument("--base", metavar="DIR", help="the jaxllm checkpoint an adapter adapts (default: the "
                            "one the LoRA run recorded)")
        parser.add_argument("--base-name", metavar="NAME", help="--adapter export: the base's HF directory or hub "
                            "name for PEFT's base_model_name_or_path (default: the recorded one)")
        args = parser.parse_args(argv)
        from jaxllm.lora import merge

        kinds = (args.src_kind, args.dst_kind)
        if args.base_name and not (args.adapter and kinds == ("jaxllm", "hf")):
            parser.error("--base-name goes with --from jaxllm --to hf --adapter")
        if args.base and not (args.adapter or args.merge):
            parser.error("--base goes with --adapter or --merge")
        if args.hf_arch != "native" and (args.dst_kind != "hf" or args.adapter or args.merge):
            parser.error("--hf-arch applies to --to hf (a plain export, not --adapter or --merge)")
        if args.adapter and kinds == ("jaxllm", "hf"):
            action = lambda: merge.export_peft(args.src, args.dst, args.base_name)
        elif args.adapter and kinds == ("hf", "jaxllm"):
            action = lambda: merge.import_adapter(args.src, args.dst, args.base)
        elif args.adapter:
            parser.error("--adapter converts jaxllm → hf (PEFT export) or hf → jaxllm (PEFT import)")
        elif args.merge and args.dst_kind == "jaxllm":
            action = lambda: merge.merge_to_jaxllm(args.src, args.dst, args.base)
        elif args.merge:
            action = lambda: merge.merge_to_hf(args.src, args.dst, args.base, dtype=args.dtype,
                                               max_shard_bytes=_size(args.max_shard_size))
        elif kinds[0] == kinds[1]:
            parser.error("--from and --to must differ (hf → jaxllm or jaxllm → hf), except with --merge")
        elif merge.is_adapter(args.src):
            parser.error(f"{args.src} is a LoRA adapter: --adapter converts it, --merge merges it into its base")
        elif kinds == ("hf", "jaxllm"):
            action = lambda: hf_to_jaxllm(args.src, args.dst, family=args.family, dtype=args.dtype,
                                          tokenizer=args.tokenizer, log=print)
        elif (args.src_kind, args.dst_kind) == ("jaxllm", "hf"):
            if args.tokenizer or args.family:
                parser.error(f"{'--tokenizer' if args.tokenizer else '--family'} applies to --from hf "
                             f"(an export takes the checkpoint's own)")
            action = lambda: jaxllm_to_hf(args.src, args.dst, dtype=args.dtype, hf_arch=args.hf_arch,
                                          max_shard_bytes=_size(args.max_shard_size), log=print)
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
