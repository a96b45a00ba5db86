"""Generation: greedy == argmax of full forwards, batching, sampling filters, seeds, sharding."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import sharding
from jaxllm.inference import SamplingParams, generate, stream
from jaxllm.inference.sampling import apply_repetition_penalty, filter_top_k, filter_top_p, sample
from jaxllm.models import forward, get_preset, init_params

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=10)
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], [30]]


@pytest.fixture(scope="module", params=["llama2-tiny", "baichuan2-13b-tiny"])
def model(request):
    cfg = get_preset(request.param)
    return cfg, init_params(cfg, jax.random.key(0))


def full_forward_greedy(cfg, params, prompt, n):
    """Argmax of a full (uncached) forward at every step; right padding is invisible to causal attention."""
    logits = jax.jit(lambda p, t: forward(cfg, p, t)[0])
    seq = list(prompt)
    for _ in range(n):
        padded = jnp.asarray([seq + [0] * (32 - len(seq))])
        seq.append(int(jnp.argmax(logits(params, padded)[len(seq) - 1])))
    return seq[len(prompt):]


def test_greedy_equals_argmax_of_full_forwards_and_batching_equals_alone(model):
    cfg, params = model
    batched = generate(cfg, params, PROMPTS, GREEDY)
    for prompt, out in zip(PROMPTS, batched.tokens):
        assert out == full_forward_greedy(cfg, params, prompt, 10)
        assert generate(cfg, params, [prompt], GREEDY).tokens[0] == out
    assert list(stream(cfg, params, PROMPTS[0], GREEDY)) == batched.tokens[0]


def test_top_k_one_is_greedy_and_seeds_reproduce(model):
    cfg, params = model
    greedy = generate(cfg, params, PROMPTS, GREEDY).tokens
    top1 = SamplingParams(temperature=1.0, top_k=1, max_new_tokens=10)
    assert generate(cfg, params, PROMPTS, top1, jax.random.key(3)).tokens == greedy
    hot = SamplingParams(temperature=1.5, top_p=0.95, max_new_tokens=10)
    a = generate(cfg, params, PROMPTS, hot, jax.random.key(7)).tokens
    assert a == generate(cfg, params, PROMPTS, hot, jax.random.key(7)).tokens
    assert a != generate(cfg, params, PROMPTS, hot, jax.random.key(8)).tokens


def test_stop_ids_end_rows_and_logprobs_match_the_model(model):
    cfg, params = model
    free = generate(cfg, params, PROMPTS[:1], GREEDY, return_logprobs=True)
    stop = free.tokens[0][3]
    stopped = generate(cfg, params, PROMPTS[:1], GREEDY, stop_ids=[stop])
    assert stopped.tokens[0] == free.tokens[0][: free.tokens[0].index(stop) + 1] and stopped.stopped[0]
    seq = PROMPTS[0] + free.tokens[0]
    logp = jax.nn.log_softmax(forward(cfg, params, jnp.asarray([seq]))[0])
    expected = [float(logp[len(PROMPTS[0]) - 1 + k, t]) for k, t in enumerate(free.tokens[0])]
    np.testing.assert_allclose(free.logprobs[0], expected, rtol=1e-4, atol=1e-5)


def test_generation_sharded_over_8_devices_equals_one_device():
    cfg = get_preset("llama2-tiny")
    params = init_params(cfg, jax.random.key(0))
    prompts = PROMPTS + [[1, 2], [3, 4, 5], [6], [7, 8, 9, 10], [11]]
    single = generate(cfg, params, prompts, GREEDY).tokens
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    sharded = jax.device_put(params, sharding.param_shardings(cfg, mesh))
    assert generate(cfg, sharded, prompts, GREEDY, mesh=mesh).tokens == single


def np_repetition_penalty(logits, seen, p):
    out = logits.copy()
    for b in range(logits.shape[0]):
        for v in np.flatnonzero(seen[b]):
            out[b, v] = logits[b, v] / p if logits[b, v] > 0 else logits[b, v] * p
    return out


def np_top_p(logits, p):
    out = np.full_like(logits, -np.inf)
    for b, row in enumerate(logits):
        order = np.argsort(-row)
        probs = np.exp(row[order] - row.max())
        probs /= probs.sum()
        cum = 0.0
        for idx, pr in zip(order, probs):
            out[b, idx] = row[idx]
            cum += pr
            if cum >= p:
                break
    return out


def test_filters_equal_numpy_references():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 50)).astype(np.float32) * 3
    seen = rng.random((3, 50)) < 0.3
    np.testing.assert_allclose(apply_repetition_penalty(jnp.asarray(logits), seen, 1.3),
                               np_repetition_penalty(logits, seen, 1.3), rtol=1e-6)
    for p in (0.1, 0.5, 0.9):
        np.testing.assert_array_equal(np.isfinite(filter_top_p(jnp.asarray(logits), p)),
                                      np.isfinite(np_top_p(logits, p)))
    kept = np.isfinite(np.asarray(filter_top_k(jnp.asarray(logits), 5)))
    assert (kept.sum(-1) == 5).all()
    assert (np.sort(np.where(kept, logits, -np.inf), -1)[:, -5:] == np.sort(logits, -1)[:, -5:]).all()
    # top-p keeps at least the argmax even for tiny p
    assert (np.isfinite(np.asarray(filter_top_p(jnp.asarray(logits), 1e-6))).sum(-1) == 1).all()
    greedy = sample(jnp.asarray(logits), jax.random.key(0), SamplingParams(temperature=0.0))
    np.testing.assert_array_equal(greedy, logits.argmax(-1))


@pytest.mark.parametrize("field,value", [("temperature", -1.0), ("top_p", 0.0), ("top_k", -2),
                                         ("repetition_penalty", 0.0), ("max_new_tokens", 0)])
def test_bad_sampling_params(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})
