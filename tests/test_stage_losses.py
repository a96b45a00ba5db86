"""Alignment losses against NumPy references of their formulas."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.stages.losses import (LLAMA2_MARGINS, dpo_loss, ranking_loss, sequence_logprobs,
                                  token_logprobs)


def np_log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def np_dpo(pc, pr, rc, rr, beta, eps=0.0):
    z = beta * ((pc - rc) - (pr - rr))
    return np.mean(-(1 - eps) * np_log_sigmoid(z) - eps * np_log_sigmoid(-z))


@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.0), (0.1, 0.2)])
def test_dpo_loss_and_gradient_equal_numpy_formula(beta, eps):
    rng = np.random.default_rng(0)
    pc, pr, rc, rr = (rng.normal(-50, 10, size=16) for _ in range(4))
    loss, metrics = dpo_loss(pc, pr, rc, rr, beta, eps)
    np.testing.assert_allclose(loss, np_dpo(pc, pr, rc, rr, beta, eps), rtol=1e-5)
    # d/dπ_c of the formula: -β[(1-ε)σ(-z) - ε σ(z)] / n, by finite differences on the NumPy side.
    grad = jax.grad(lambda x: dpo_loss(x, pr, rc, rr, beta, eps)[0])(jnp.asarray(pc))
    h = 1e-4
    for i in range(3):
        up, down = pc.copy(), pc.copy()
        up[i] += h
        down[i] -= h
        numeric = (np_dpo(up, pr, rc, rr, beta, eps) - np_dpo(down, pr, rc, rr, beta, eps)) / (2 * h)
        np.testing.assert_allclose(grad[i], numeric, rtol=1e-3, atol=1e-7)
    chosen = beta * (pc - rc)
    rejected = beta * (pr - rr)
    np.testing.assert_allclose(metrics["reward_accuracy"], np.mean(chosen > rejected))
    np.testing.assert_allclose(metrics["reward_margin"], np.mean(chosen - rejected), rtol=1e-5)


def test_dpo_loss_is_log2_when_chosen_equals_rejected():
    logps = jnp.asarray([-3.0, -10.0, -0.5])
    loss, metrics = dpo_loss(logps, logps, logps + 1.0, logps + 1.0, beta=0.1)
    np.testing.assert_allclose(loss, np.log(2.0), rtol=1e-6)
    assert float(metrics["reward_accuracy"]) == 0.0


def test_ranking_loss_equals_formula_with_margins():
    rng = np.random.default_rng(1)
    rc, rr = rng.normal(size=8), rng.normal(size=8)
    ratings = ["significantly better", "better", "slightly better", "unsure"] * 2
    margin = np.asarray([LLAMA2_MARGINS["large"][r] for r in ratings])
    loss, metrics = ranking_loss(rc, rr, margin)
    np.testing.assert_allclose(loss, np.mean(-np_log_sigmoid(rc - rr - margin)), rtol=1e-5)
    np.testing.assert_allclose(metrics["accuracy"], np.mean(rc > rr))
    assert LLAMA2_MARGINS["large"]["significantly better"] == 3.0


def test_sequence_logprobs_sum_only_masked_tokens():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    targets = rng.integers(0, 7, size=(2, 5))
    mask = np.array([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]], np.float32)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = (np.take_along_axis(logp, targets[..., None], -1)[..., 0] * mask).sum(-1)
    np.testing.assert_allclose(sequence_logprobs(logits, targets, mask), expected, rtol=1e-5)
    np.testing.assert_allclose(token_logprobs(logits, targets),
                               np.take_along_axis(logp, targets[..., None], -1)[..., 0], rtol=1e-5)


def test_reward_model_reads_the_last_token_and_ignores_padding():
    from jaxllm.models import get_preset, init_params
    from jaxllm.stages import reward

    cfg = get_preset("llama2-tiny")
    params = reward.from_lm_params(init_params(cfg, jax.random.key(0)), cfg, jax.random.key(1))
    assert "lm_head" not in params["backbone"]
    tokens = jnp.asarray([[5, 6, 7, 8, 0, 0], [5, 6, 7, 8, 9, 10]])
    segments = jnp.asarray([[1, 1, 1, 1, 0, 0], [1] * 6])
    positions = jnp.broadcast_to(jnp.arange(6), (2, 6))
    out = reward.scores(cfg, params, tokens, positions, segments, jnp.asarray([3, 3]))
    np.testing.assert_allclose(out[0], out[1], rtol=1e-6)  # same first 4 tokens; later ones are unseen
    values = reward.token_values(cfg, params, tokens, positions, segments)
    np.testing.assert_allclose(values[:, 3], out, rtol=1e-5)
    grads = jax.grad(lambda p: reward.scores(cfg, p, tokens, positions, segments, jnp.asarray([3, 5])).sum())(params)
    assert float(jnp.abs(grads["head"]["kernel"]).sum()) > 0
