"""Tokens/s of the data pipeline (read → tokenize → pack → mix → batch) against the train step that consumes
it, for a recipe's data and batch shape; the ratio is the pipeline's headroom (it must stay above 1).

    python bench/data_pipeline.py                       # configs/demo.yaml: shipped zh/en corpus, 16 × 128
    python bench/data_pipeline.py configs/demo.yaml data.seq_len=512 train.batch_size=8
    python bench/data_pipeline.py --bucket              # the same corpus also read from the GCS emulator
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def pipeline_tokens_per_second(config, batches: int, prefetch: int) -> tuple[float, dict]:
    from jaxllm.data import load_tokenizer, pretraining_batches

    data = config.data
    data.prefetch = prefetch
    tokenizer = load_tokenizer(data.tokenizer)
    iterator = pretraining_batches(data, tokenizer, batch_size=config.train.batch_size, seed=config.seed,
                                   shard_index=0, shard_count=1)
    next(iterator)  # open files, first block
    start = time.perf_counter()
    tokens = 0
    for _ in range(batches):
        tokens += next(iterator)["tokens"].size
    elapsed = time.perf_counter() - start
    stats = iterator.stats()
    iterator.close()
    return tokens / elapsed, stats


@contextlib.contextmanager
def gcs_emulator():
    """A gcp-storage-emulator on a free 127.0.0.1 port, gcsfs pointed at it, for the run of the block."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    exe = os.path.join(os.path.dirname(sys.executable), "gcp-storage-emulator")
    proc = subprocess.Popen([exe, "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # it logs every request
    os.environ.update(STORAGE_EMULATOR_HOST=url, FSSPEC_GCS_TOKEN="anon", NO_GCE_CHECK="true",
                      GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false")  # no gRPC bucket-type probe (it waits)
    try:
        for _ in range(150):
            try:
                urllib.request.urlopen(f"{url}/storage/v1/b?project=bench", timeout=1).read()
                break
            except OSError:
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def in_bucket(config, bucket: str):
    """`config` with every data source copied into gs://`bucket` and read from there."""
    from jaxllm import storage
    from jaxllm.data.files import expand_paths

    storage.filesystem(f"gs://{bucket}")[0].mkdir(bucket)
    config = copy.deepcopy(config)
    for source in config.data.sources:
        uploaded = []
        for file in expand_paths(source.path):
            uploaded.append(f"gs://{bucket}/{source.name or 'data'}/{Path(file).name}")
            storage.copy(file, uploaded[-1])
        source.path = uploaded
    return config


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", nargs="?", default=str(Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"))
    parser.add_argument("overrides", nargs="*", help="key=value")
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--steps", type=int, default=10, help="timed train steps")
    parser.add_argument("--bucket", action="store_true",
                        help="also read the sources from a GCS emulator (gcp-storage-emulator, started here)")
    args = parser.parse_args(argv)

    from train_step import jax_tokens_per_second

    from jaxllm.train.config import load_config

    config = load_config(args.recipe, args.overrides)
    batch, seq_len = config.train.batch_size, config.data.seq_len
    print(f"{Path(args.recipe).name}: batch {batch} × {seq_len} tokens, sources "
          f"{', '.join(f'{s.name} ({s.weight:g})' for s in config.data.resolved_sources())}\n")
    rows = {}
    for prefetch in (0, config.data.prefetch or 2):
        tps, stats = pipeline_tokens_per_second(config, args.batches, prefetch)
        rows[f"data pipeline, {'no prefetch' if not prefetch else f'prefetch {prefetch}'}"] = tps
    if args.bucket:
        with gcs_emulator():
            remote = in_bucket(config, "jaxllm-bench")
            for prefetch in (0, config.data.prefetch or 2):
                tps, _ = pipeline_tokens_per_second(remote, args.batches, prefetch)
                rows[f"data pipeline from gs:// (emulator), {'no prefetch' if not prefetch else f'prefetch {prefetch}'}"] = tps
    step_tps, _, _ = jax_tokens_per_second(config.model, batch, seq_len, args.steps, warmup=2)
    rows[f"train step ({config.model.name}, {config.model.dtype})"] = step_tps
    width = max(map(len, rows))
    print(f"{'stage':<{width}}  {'tokens/s':>12}")
    for name, tps in rows.items():
        print(f"{name:<{width}}  {tps:12.0f}")
    slowest_pipeline = min(v for k, v in rows.items() if k.startswith("data"))
    print(f"\npipeline / train step: {slowest_pipeline / step_tps:.0f}x "
          f"(documents read: {stats['documents']}, skipped: {stats['skipped']})")


if __name__ == "__main__":
    main()
