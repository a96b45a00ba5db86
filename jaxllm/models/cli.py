"""`jaxllm presets`: every preset with its parameter count (computed with `jax.eval_shape`)."""
from __future__ import annotations

import argparse


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="jaxllm presets", description=__doc__)
    parser.add_argument("--all", action="store_true", help="include the tiny test/demo presets")
    args = parser.parse_args(argv)
    from jaxllm.models import PRESETS, PUBLISHED, count_params, get_preset

    names = PRESETS if args.all else PUBLISHED
    print(f"{'preset':<20} {'params':>16}  {'layers':>6} {'hidden':>6} {'heads':>5} {'kv':>3} "
          f"{'vocab':>7}  position")
    for name in names:
        cfg = get_preset(name)
        print(f"{name:<20} {count_params(cfg):>16,}  {cfg.num_layers:>6} {cfg.hidden_size:>6} "
              f"{cfg.num_heads:>5} {cfg.num_kv_heads:>3} {cfg.vocab_size:>7}  {cfg.position}"
              f"{' +normhead' if cfg.norm_head else ''}")
    return 0
