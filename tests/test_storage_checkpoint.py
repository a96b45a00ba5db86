"""Checkpoints and conversion straight to and from a bucket (the GCS emulator; tensorstore writes the arrays)."""
import json

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from jaxllm import storage
from jaxllm.checkpoint import CheckpointError, load_params, read_model_config
from jaxllm.convert.core import hf_to_jaxllm, jaxllm_to_hf
from jaxllm.convert.hf_config import hf_config_from_model
from jaxllm.convert.readers import open_hf
from jaxllm.models import get_preset
from reference import random_hf_state_dict


def write_hf(directory, cfg):
    """An HF Llama directory (config.json + one safetensors file) with random weights."""
    directory.mkdir(parents=True)
    state = random_hf_state_dict(cfg)
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(directory / "model.safetensors"))
    hf_cfg, gen_cfg = hf_config_from_model(cfg, "float32", layout="llama")
    (directory / "config.json").write_text(json.dumps(hf_cfg))
    (directory / "generation_config.json").write_text(json.dumps(gen_cfg))
    return state


def all_tensors(directory):
    reader = open_hf(directory)
    return {k: np.asarray(reader.get(k)) for k in reader.keys()}


@pytest.mark.parametrize("store", ["gcs", "s3"])
def test_convert_round_trip_through_a_bucket(tmp_path, store, request):
    gcs = request.getfixturevalue(store)  # the bucket
    cfg = get_preset("llama2-tiny")
    write_hf(tmp_path / "hf", cfg)
    storage.copytree(tmp_path / "hf", f"{gcs}/hf")
    # HF in the bucket → jaxllm checkpoint in the bucket (orbax/tensorstore write the arrays there)
    hf_to_jaxllm(f"{gcs}/hf", f"{gcs}/jx")
    assert storage.is_file(f"{gcs}/jx/model.json") and storage.is_file(f"{gcs}/jx/0/record.json")
    assert not storage.glob(f"{gcs}/.jx.partial-*", must_match=False)  # the staging prefix is gone
    assert not list(tmp_path.glob("gs*")) and not list(tmp_path.glob("s3*"))  # nothing staged locally
    params, jcfg = load_params(f"{gcs}/jx")
    hf_to_jaxllm(tmp_path / "hf", tmp_path / "jx")
    local, _ = load_params(tmp_path / "jx")
    assert jcfg == read_model_config(tmp_path / "jx")
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: np.array_equal(a, b), params, local)))
    # jaxllm in the bucket → HF in the bucket, bit-exact
    jaxllm_to_hf(f"{gcs}/jx", f"{gcs}/hf2")
    original, exported = all_tensors(tmp_path / "hf"), all_tensors(f"{gcs}/hf2")
    assert set(original) == set(exported) and all(np.array_equal(original[k], exported[k]) for k in original)
    with pytest.raises(Exception, match="destination exists"):
        hf_to_jaxllm(f"{gcs}/hf", f"{gcs}/jx")


def test_checkpoint_errors_name_the_bucket_path(gcs):
    with pytest.raises(CheckpointError, match=f"^{gcs}/none: no such directory$"):
        load_params(f"{gcs}/none")
    with pytest.raises(storage.StorageError, match="gs://no-such-bucket-jaxllm.*does not exist"):
        load_params("gs://no-such-bucket-jaxllm/ckpt")
