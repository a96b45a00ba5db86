"""`model.loss_chunk`: the output layer and loss computed a slice of the sequence at a time give the loss,
metrics and gradients of the whole-sequence path (NormHead, tied embeddings and the max-z term included),
on one device and sharded."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import sharding
from jaxllm.config import ConfigError
from jaxllm.models import get_preset, init_params, param_shardings
from jaxllm.train.loss import lm_loss


def batch(cfg, rows=4, length=32, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.vocab_size, (rows, length + 1))
    mask = (rng.random((rows, length)) > 0.2).astype(np.float32)
    segments = np.repeat(np.arange(2), length // 2)[None].repeat(rows, 0) + 1
    positions = np.tile(np.arange(length // 2), 2)[None].repeat(rows, 0)
    return {"tokens": jnp.asarray(tokens[:, :-1], jnp.int32), "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
            "loss_mask": jnp.asarray(mask), "segment_ids": jnp.asarray(segments, jnp.int32),
            "positions": jnp.asarray(positions, jnp.int32)}


def loss_and_grads(cfg, params, data):
    return jax.jit(jax.value_and_grad(lm_loss(cfg), has_aux=True))(params, data, None)


@pytest.mark.parametrize("preset,extra", [("llama2-tiny", {}), ("baichuan2-tiny", {"z_loss_weight": 2e-4}),
                                          ("llama2-tiny", {"tie_embeddings": True}),
                                          ("baichuan-13b-tiny", {})])
def test_chunks_give_the_whole_sequence_loss_and_gradients(preset, extra):
    whole = get_preset(preset, **extra)
    params = init_params(whole, jax.random.key(0))
    data = batch(whole)
    (want, want_m), want_g = loss_and_grads(whole, params, data)
    for chunk in (8, 16):
        (got, got_m), got_g = loss_and_grads(whole.replace(loss_chunk=chunk), params, data)
        np.testing.assert_allclose(got, want, rtol=1e-6)
        for key in want_m:
            np.testing.assert_allclose(got_m[key], want_m[key], rtol=1e-6, atol=1e-9, err_msg=key)
        for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_chunks_sharded_over_eight_devices_match_one():
    if jax.device_count() < 8:
        pytest.skip("needs 8 (fake CPU) devices")
    cfg = get_preset("llama2-tiny", loss_chunk=8)
    params = init_params(cfg, jax.random.key(1))
    data = batch(cfg, rows=8)
    (want, _), want_g = loss_and_grads(cfg, params, data)
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    shardings = param_shardings(cfg, mesh)
    with jax.set_mesh(mesh), sharding.axis_rules():
        sharded = init_params(cfg, jax.random.key(1), shardings)
        rows = {k: jax.device_put(v, sharding.batch_sharding(mesh)) for k, v in data.items()}
        (got, _), got_g = loss_and_grads(cfg, sharded, rows)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_a_chunk_that_does_not_divide_the_sequence_is_refused():
    from test_train_loop import tiny_config

    with pytest.raises(ConfigError, match="model.loss_chunk=12 does not divide data.seq_len=32"):
        tiny_config("runs/x", model={"loss_chunk": 12}).validate()
    assert tiny_config("runs/x", model={"loss_chunk": 8}).validate().model.loss_chunk == 8
