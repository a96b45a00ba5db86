"""The same Llama-2-7B training step compiled by MaxText and by jaxllm with the same TPU compiler, from this
CPU host (compile-only: nothing runs, no TPU needed): per-chip argument / temporary / total memory and the
collectives per step of both, and jaxllm's ratio to MaxText.

    python bench/vs_maxtext.py                             # 32 layers, fused and einsum attention (~15 min)
    python bench/vs_maxtext.py --layers 2 --attention fused

The step (identical arguments on both sides): v5p-8 (4 chips), FSDP over the 4 chips, 16 rows x 4,096 tokens
(4 per chip, one micro-batch), full remat, scanned layers, float32 parameters and Adam moments, bfloat16
compute. MaxText's flags: model_name=llama2-7b override_model_config=True base_num_decoder_layers=L
compile_topology=v5p-8 compile_topology_num_slices=1 per_device_batch_size=4 max_target_length=4096
remat_policy=full ici_fsdp_parallelism=4 dataset_type=synthetic weight_dtype=float32 dtype=bfloat16
enable_checkpointing=false attention=flash|dot_product. jaxllm's: `jaxllm train llama2-7b-pretrain
--compile-only --topology v5p-8 model.num_layers=L train.batch_size=16 train.grad_accum=1
model.dtype=bfloat16 model.attention=splash|reference model.loss_chunk=C`.

MaxText (`maxtext[tpu]`, Python >= 3.12) is not a jaxllm dependency: it is installed on first use into its
own virtual environment (`--venv`, made with `python3.12`), together with this checkout of jaxllm (editable,
without dependencies: MaxText brings jax, flax, optax, orbax and libtpu), so both sides compile with one
jax / libtpu. Memory is XLA's `memory_analysis()` of the compiled step for one chip; total = arguments +
outputs - aliased + temporaries, on both sides. Collectives are counted in the optimized HLO by
`jaxllm.preflight.collectives` (per step, loop trip counts applied) for both programs.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAXTEXT = "maxtext[tpu]==0.2.5"
PATHS = {"fused": ("flash", "splash"), "einsum": ("dot_product", "reference")}  # ours -> (MaxText, jaxllm)
FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
          "generated_code_size_in_bytes")


# ----------------------------------------------------------------------------------------- inside the venv

def maxtext_step(layers: int, attention: str) -> dict:
    import maxtext
    import maxtext.trainers.pre_train.train_compile as train_compile

    compiled = {}
    compile_ = train_compile.jit_and_compile

    def keep(*args, **kwargs):  # the compiled step train_compile.main builds and drops
        compiled["step"] = compile_(*args, **kwargs)
        return compiled["step"]

    train_compile.jit_and_compile = keep
    base = Path(maxtext.__file__).parent / "configs" / "base.yml"
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"vs-maxtext-{os.getpid()}"
    train_compile.main(["train_compile", str(base), "model_name=llama2-7b", "override_model_config=True",
                        f"base_num_decoder_layers={layers}", "compile_topology=v5p-8",
                        "compile_topology_num_slices=1", "per_device_batch_size=4", "max_target_length=4096",
                        "remat_policy=full", "ici_fsdp_parallelism=4", "dataset_type=synthetic",
                        "weight_dtype=float32", "dtype=bfloat16", "enable_checkpointing=false",
                        f"attention={attention}", "run_name=vs-jaxllm", f"base_output_directory={out}"])
    shutil.rmtree(out, ignore_errors=True)
    return _stats(compiled["step"])


def jaxllm_step(layers: int, attention: str, loss_chunk: int) -> dict:
    from jaxllm.preflight import topology as topologies
    from jaxllm.preflight.train import preflight_train
    from jaxllm.train.config import load_config
    from jaxllm.train.stage import pretraining_objective

    config = load_config("llama2-7b-pretrain", [
        f"model.num_layers={layers}", "train.batch_size=16", "train.grad_accum=1", "model.dtype=bfloat16",
        "model.remat=full", f"model.attention={attention}", f"model.loss_chunk={loss_chunk}",
        "mesh.data=1", "mesh.fsdp=4", "mesh.tensor=1"])
    report = preflight_train(config, pretraining_objective, topologies.parse("v5p-8"), suggest=False,
                             log=lambda *a, **k: None)
    (program,) = [p for p in report.programs if p.compiled is not None]
    return _stats(program.compiled)


def _stats(compiled) -> dict:
    import jax

    from jaxllm.preflight.collectives import KINDS, collectives

    memory = compiled.memory_analysis()
    found = collectives(compiled.as_text())
    return {**{name: int(getattr(memory, name)) for name in FIELDS},
            "collectives": {k: [found.by_kind[k].count, found.by_kind[k].bytes] for k in KINDS},
            "jax": jax.__version__}


# ----------------------------------------------------------------------------------------- the table

def ensure_venv(venv: Path, python: str) -> Path:
    exe = venv / "bin" / "python"
    if exe.exists() and subprocess.run([exe, "-c", "import maxtext, jaxllm"], capture_output=True).returncode == 0:
        return exe
    found = shutil.which(python) or next(iter(sorted(Path.home().glob(".pyenv/versions/3.12*/bin/python3.12"))), None)
    if not found:
        sys.exit(f"vs_maxtext: {python} not found (MaxText needs Python >= 3.12); pass --python")
    print(f"installing {MAXTEXT} and this jaxllm into {venv} (once) ...", flush=True)
    subprocess.run([found, "-m", "venv", str(venv)], check=True)
    subprocess.run([exe, "-m", "pip", "install", "-q", MAXTEXT], check=True)
    subprocess.run([exe, "-m", "pip", "install", "-q", "--no-deps", "-e", str(ROOT)], check=True)
    return exe


def run_inner(exe: Path, *args) -> dict:
    start = time.perf_counter()
    done = subprocess.run([exe, __file__, "--inner", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        sys.exit(f"vs_maxtext: {' '.join(map(str, args))} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    return {**json.loads(lines[-1][len("RESULT "):]), "seconds": time.perf_counter() - start}


def row(name: str, s: dict) -> str:
    gib = 2**30
    total = s["argument_size_in_bytes"] + s["output_size_in_bytes"] - s["alias_size_in_bytes"] + s["temp_size_in_bytes"]
    s["total"] = total
    coll = " ".join(f"{c[0]}/{c[1] / gib:.2f}" for c in s["collectives"].values())
    return (f"{name:<30}{s['argument_size_in_bytes'] / gib:>10.2f}{s['temp_size_in_bytes'] / gib:>10.2f}"
            f"{total / gib:>10.2f}   {coll:<44}{s['seconds']:>7.0f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--attention", nargs="+", choices=sorted(PATHS), default=["fused", "einsum"])
    parser.add_argument("--loss-chunk", type=int, default=0, help="jaxllm's model.loss_chunk (0: off)")
    parser.add_argument("--venv", type=Path, default=Path.home() / ".cache" / "jaxllm" / "bench-maxtext-venv")
    parser.add_argument("--python", default="python3.12")
    parser.add_argument("--inner", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.inner:
        side, layers, attention, *chunk = args.inner
        stats = maxtext_step(int(layers), attention) if side == "maxtext" else \
            jaxllm_step(int(layers), attention, int(chunk[0]))
        print("RESULT " + json.dumps(stats), flush=True)
        return 0
    exe = ensure_venv(args.venv, args.python)
    print(f"Llama-2-7B step, {args.layers} layers, v5p-8 (fsdp 4), 16 x 4096 tokens, full remat, fp32 params and "
          f"Adam, bf16 compute; GiB per chip; collectives count/GiB per step "
          f"(all-gather reduce-scatter all-reduce all-to-all permute)")
    print(f"{'':<30}{'arguments':>10}{'temps':>10}{'total':>10}   {'collectives':<44}{'compile s':>7}")
    ratios = []
    for path in args.attention:
        theirs, ours = PATHS[path]
        mt = run_inner(exe, "maxtext", args.layers, theirs)
        jx = run_inner(exe, "jaxllm", args.layers, ours, args.loss_chunk)
        print(row(f"MaxText attention={theirs}", mt))
        print(row(f"jaxllm attention={ours}", jx))
        ratios.append((path, jx["total"] / mt["total"]))
    print(f"(jax {mt['jax']} on both sides) jaxllm / MaxText per chip: "
          + ", ".join(f"{path} {ratio:.3f}x" for path, ratio in ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
