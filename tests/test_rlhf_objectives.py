"""PPO math against plain NumPy loops of the formulas."""
import jax.numpy as jnp
import numpy as np

from jaxllm.rlhf.objectives import gae, kl_penalised_rewards, policy_loss, value_loss, whiten


def rollout(seed=0, batch=3, seq=7):
    rng = np.random.default_rng(seed)
    lengths = [7, 4, 1]
    mask = np.zeros((batch, seq), np.float32)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    f = lambda *s: rng.normal(size=s).astype(np.float32)
    return dict(mask=mask, lengths=lengths, logp=f(batch, seq) - 2, ref=f(batch, seq) - 2,
                old=f(batch, seq) - 2, values=f(batch, seq), old_values=f(batch, seq),
                scores=f(batch), adv=f(batch, seq), returns=f(batch, seq))


def test_kl_penalised_rewards_and_gae_equal_numpy_loops():
    r = rollout()
    beta, gamma, lam = 0.01, 0.99, 0.95
    rewards, kl = kl_penalised_rewards(r["scores"], r["logp"], r["ref"], r["mask"], beta)
    adv, ret = gae(rewards, r["values"], r["mask"], gamma, lam)
    for i, n in enumerate(r["lengths"]):
        exp_r = [-beta * (r["logp"][i, t] - r["ref"][i, t]) for t in range(n)]
        exp_r[-1] += r["scores"][i]
        np.testing.assert_allclose(rewards[i, :n], exp_r, rtol=1e-5, atol=1e-6)
        assert not np.asarray(rewards[i, n:]).any()
        a, exp_adv = 0.0, [0.0] * n
        for t in reversed(range(n)):
            next_v = r["values"][i, t + 1] if t + 1 < n else 0.0
            delta = exp_r[t] + gamma * next_v - r["values"][i, t]
            a = delta + gamma * lam * a
            exp_adv[t] = a
        np.testing.assert_allclose(adv[i, :n], exp_adv, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ret[i, :n], np.asarray(exp_adv) + r["values"][i, :n], rtol=1e-5, atol=1e-6)
        assert not np.asarray(adv[i, n:]).any()
    np.testing.assert_allclose(kl, (r["logp"] - r["ref"]) * r["mask"], rtol=1e-6)


def test_policy_and_value_losses_equal_numpy_formulas():
    r = rollout(1)
    m = r["mask"].astype(bool)
    loss, metrics = policy_loss(r["logp"], r["old"], r["adv"], r["mask"], clip=0.2)
    ratio = np.exp(r["logp"] - r["old"])
    surrogate = np.maximum(-r["adv"] * ratio, -r["adv"] * np.clip(ratio, 0.8, 1.2))
    np.testing.assert_allclose(loss, surrogate[m].mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["clip_fraction"], (np.abs(ratio - 1) > 0.2)[m].mean(), rtol=1e-6)
    vl = value_loss(r["values"], r["old_values"], r["returns"], r["mask"], clip=0.2)
    clipped = r["old_values"] + np.clip(r["values"] - r["old_values"], -0.2, 0.2)
    expected = 0.5 * np.maximum((r["values"] - r["returns"]) ** 2, (clipped - r["returns"]) ** 2)
    np.testing.assert_allclose(vl, expected[m].mean(), rtol=1e-5)


def test_on_policy_ratio_one_gives_minus_mean_advantage_and_no_clipping():
    r = rollout(2)
    loss, metrics = policy_loss(r["old"], r["old"], r["adv"], r["mask"])
    np.testing.assert_allclose(loss, -r["adv"][r["mask"].astype(bool)].mean(), rtol=1e-5)
    assert float(metrics["clip_fraction"]) == 0.0


def test_whiten_gives_zero_mean_unit_variance_on_the_mask():
    r = rollout(3)
    w = np.asarray(whiten(jnp.asarray(r["adv"]), r["mask"]))
    m = r["mask"].astype(bool)
    np.testing.assert_allclose(w[m].mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(w[m].std(), 1.0, rtol=1e-3)
    assert not w[~m].any()
