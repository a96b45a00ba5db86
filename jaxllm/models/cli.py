"""`jaxllm presets`: every preset with its parameter count (computed with `jax.eval_shape`): the published
sizes, the `demo` model `jaxllm train` trains, and the tiny test configurations (marked as such)."""
from __future__ import annotations

import argparse


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="jaxllm presets", description=__doc__)
    parser.add_argument("--published", action="store_true", help="only the published model sizes")
    parser.add_argument("--all", action="store_true", help=argparse.SUPPRESS)  # the default now; kept for scripts
    args = parser.parse_args(argv)
    from jaxllm.models import PRESETS, PUBLISHED, count_params, get_preset

    names = PUBLISHED if args.published else PRESETS
    print(f"{'preset':<20} {'params':>16}  {'layers':>6} {'hidden':>6} {'heads':>5} {'kv':>3} "
          f"{'vocab':>7}  {'position':<18} kind")
    for name in names:
        cfg = get_preset(name)
        kind = "published" if name in PUBLISHED else ("demo (jaxllm train)" if name == "demo" else "tiny (tests)")
        position = cfg.position + (" +normhead" if cfg.norm_head else "")
        print(f"{name:<20} {count_params(cfg):>16,}  {cfg.num_layers:>6} {cfg.hidden_size:>6} "
              f"{cfg.num_heads:>5} {cfg.num_kv_heads:>3} {cfg.vocab_size:>7}  {position:<18} {kind}")
    return 0
