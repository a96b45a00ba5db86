"""What the checkpoint digests cost: on save (the digests of params and optimizer state, computed where the
arrays live before orbax copies them) and on restore (the same computation on what was read), against the
orbax save and restore of the same arrays; plus the host digest that `convert` and `convert --to hf` use.

    python bench/checkpoint_digest.py                          # the demo model, params + AdamW state
    python bench/checkpoint_digest.py --preset 1b --params-only --tmp /big/scratch   # a 1.0B-parameter model

The scratch checkpoint is written under --tmp (default: the system's temporary directory) and deleted.
"""
from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import time
from pathlib import Path

# ~1.04B parameters in the Llama layout (hidden 2048, 18 layers, 32k vocabulary): a 1B-class checkpoint.
ONE_B = dict(hidden_size=2048, intermediate_size=5504, num_layers=18, num_heads=16, num_kv_heads=16,
             vocab_size=32000, max_position_embeddings=2048)


def model_config(name: str):
    from jaxllm.models import get_preset

    if name == "1b":
        return get_preset("llama2-7b", **ONE_B, dtype="float32", param_dtype="float32").replace(name="llama-1b")
    return get_preset(name, dtype="float32", param_dtype="float32")


def best_of(repeats: int, fn):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="demo", help="a model preset, or 1b")
    parser.add_argument("--params-only", action="store_true", help="no optimizer state (halves the memory)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tmp", default=None, help="scratch directory for the checkpoint")
    args = parser.parse_args(argv)

    import jax
    import numpy as np
    import optax
    import orbax.checkpoint as ocp

    from jaxllm.checkpoint import manager
    from jaxllm.checkpoint.digests import device_digests, host_digest
    from jaxllm.models import count_params, init_params

    config = model_config(args.preset)
    params = jax.jit(init_params, static_argnums=0)(config, jax.random.key(0))
    state = {"params": params}
    if not args.params_only:
        state["opt_state"] = optax.adamw(1e-3).init(params)
    jax.block_until_ready(state)
    size = sum(x.nbytes for x in jax.tree.leaves(state))
    print(f"{config.name}: {count_params(config):,} parameters; checkpoint of "
          f"{'params' if args.params_only else 'params + AdamW state'}: {size / 2**30:.2f} GiB, "
          f"{len(jax.tree.leaves(state))} arrays; {jax.device_count()} {jax.devices()[0].platform} device(s)\n")

    device_digests(state)  # compile
    t_digest = best_of(args.repeats, lambda: device_digests(state))
    scratch = Path(tempfile.mkdtemp(prefix="jaxllm-digest-bench-", dir=args.tmp))
    try:
        items = tuple(state)
        with manager(scratch, item_names=items, async_save=True) as mngr:
            start = time.perf_counter()
            mngr.save(1, args=ocp.args.Composite(**{k: ocp.args.StandardSave(v) for k, v in state.items()}))
            t_blocking = time.perf_counter() - start
            mngr.wait_until_finished()
            t_save = time.perf_counter() - start
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        state.clear()  # free the arrays before reading them back
        del params
        with manager(scratch, item_names=items) as mngr:
            start = time.perf_counter()
            restored = mngr.restore(1, args=ocp.args.Composite(**{k: ocp.args.StandardRestore(v)
                                                                  for k, v in target.items()}))
            restored = {k: restored[k] for k in items}
            jax.block_until_ready(restored)
            t_restore = time.perf_counter() - start
        t_verify = best_of(args.repeats, lambda: device_digests(restored))
        host = np.asarray(jax.device_get(restored["params"]["embedding"]))
        t_host = best_of(args.repeats, lambda: host_digest(host)) * (2**30 / host.nbytes)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    rows = [("save: orbax (blocking part)", t_blocking, None), ("save: orbax (until committed)", t_save, None),
            ("save: digests (added, blocking)", t_digest, t_digest / t_save),
            ("restore: orbax", t_restore, None), ("restore: verify digests", t_verify, t_verify / t_restore)]
    width = max(len(name) for name, _, _ in rows)
    print(f"{'step':<{width}}  {'seconds':>9}  {'s/GiB':>7}  {'vs orbax':>8}")
    for name, seconds, ratio in rows:
        print(f"{name:<{width}}  {seconds:>9.3f}  {seconds / (size / 2**30):>7.2f}  "
              f"{'' if ratio is None else f'{ratio:.2f}x':>8}")
    print(f"\nhost digest (convert's writer, the export reader): {t_host:.2f} s/GiB")
    if not math.isfinite(t_digest):
        raise SystemExit("no timing")


if __name__ == "__main__":
    main()
