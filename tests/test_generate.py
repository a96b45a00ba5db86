"""Generation: greedy == argmax of full forwards, batching, sampling filters, seeds, stop strings, padded
vocabulary rows, sharding, family defaults."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import models, sharding
from jaxllm.inference import FAMILY_DEFAULTS, SamplingParams, generate, stream
from jaxllm.inference.generate import effective_vocab_limit
from jaxllm.inference.sampling import apply_repetition_penalty, filter_top_k, filter_top_p, sample
from jaxllm.inference.stops import find_stop, held_back, stop_length
from jaxllm.models import forward, get_preset, init_params

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=10)
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], [30]]


@functools.lru_cache(maxsize=None)
def tiny_model(name):
    cfg = get_preset(name)
    return cfg, init_params(cfg, jax.random.key(0))


@pytest.fixture(scope="module", params=["llama2-tiny", "baichuan2-13b-tiny"])
def model(request):
    return tiny_model(request.param)


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama2-tiny")


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


def test_generation_sharded_over_8_devices_equals_one_device(llama):
    cfg, params = llama
    prompts = PROMPTS + [[1, 2], [3, 4, 5], [6], [7, 8, 9, 10], [11]]
    single = generate(cfg, params, prompts, GREEDY).tokens
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    sharded = jax.device_put(params, models.param_shardings(cfg, mesh))
    assert generate(cfg, sharded, prompts, GREEDY, mesh=mesh).tokens == single
    # chat's path: one prompt, padded to the 4 batch shards
    assert list(stream(cfg, sharded, prompts[0], GREEDY, mesh=mesh)) == single[0]


def text_of(ids):
    """A decode with unambiguous token boundaries."""
    return "".join(f"<{i}>" for i in ids)


def test_stop_strings_end_generation_at_the_token_that_completes_them(llama):
    cfg, params = llama
    free = generate(cfg, params, PROMPTS, GREEDY).tokens
    stop = text_of(free[0][3:5])
    expected = [next((k for k in range(1, len(f) + 1) if stop in text_of(f[:k])), len(f)) for f in free]
    assert expected[0] <= 5
    result = generate(cfg, params, PROMPTS, GREEDY, stop_strings=[stop], decode=text_of, check_every=2)
    assert result.tokens == [f[:k] for f, k in zip(free, expected)]
    assert result.stopped == [stop in text_of(f) for f in free]
    # decoding really ends early: one row alone runs only to the end of the chunk holding the stop
    alone = generate(cfg, params, PROMPTS[:1], GREEDY, stop_strings=[stop], decode=text_of, check_every=2)
    assert alone.tokens[0] == free[0][:expected[0]] and expected[0] <= alone.steps < expected[0] + 2
    assert generate(cfg, params, PROMPTS[:1], GREEDY).steps == GREEDY.max_new_tokens
    with pytest.raises(ValueError, match="decode="):
        generate(cfg, params, PROMPTS, GREEDY, stop_strings=["x"])
    with pytest.raises(ValueError, match="non-empty"):
        generate(cfg, params, PROMPTS, GREEDY, stop_strings=[""], decode=text_of)


def test_stop_string_helpers():
    assert find_stop("ab User: c Bot:", ["Bot:", "User:"]) == 3 and find_stop("abc", ["x"]) is None
    assert held_back("hello Us", ["User:"]) == 2 and held_back("hello", ["User:"]) == 0
    assert held_back("a\n", ["\n\n", "User"]) == 1
    ids = [1, 2, 3, 4, 5]
    assert stop_length(ids, text_of, ["<3><4>"]) == 4 and stop_length(ids, text_of, ["<9>"]) is None


def boost_padded_rows(cfg, params, pieces: int, token: int | None = None):
    """Params whose logits for ids >= pieces (or for `token`) dwarf all others at every position: residual
    dimension 0 is a large positive constant, which the head reads with a large weight."""
    emb = np.array(params["embedding"])
    emb[:, 0] = 100.0
    head = np.array(params["lm_head"])
    head[0, :] = 0.0
    head[0, pieces:] = 50.0
    if token is not None:
        head[0, token] = 80.0
    return {**params, "embedding": jnp.asarray(emb), "lm_head": jnp.asarray(head)}


def test_padded_vocabulary_rows_are_never_sampled(llama):
    cfg, params = llama
    boosted = boost_padded_rows(cfg, params, 200)
    assert all(t >= 200 for t in generate(cfg, boosted, PROMPTS, GREEDY).tokens[0])  # the test can fail
    out = generate(cfg, boosted, PROMPTS, GREEDY, vocab_limit=200).tokens
    assert all(t < 200 for row in out for t in row) and all(len(row) == 10 for row in out)
    assert all(t < 200 for t in stream(cfg, boosted, PROMPTS[0], GREEDY, vocab_limit=200))
    logits = jnp.zeros((2, 256)).at[:, 200:].set(1e4)
    for sampling in (GREEDY, SamplingParams(temperature=1.0, top_p=0.9)):
        assert (np.asarray(sample(logits, jax.random.key(0), sampling, vocab_limit=200)) < 200).all()
    # the limit is the fewer of the tokenizer's pieces and the config's, None when nothing is padded
    assert effective_vocab_limit(cfg) is None and effective_vocab_limit(cfg, 300) is None
    ctllm = get_preset("ctllm-tiny")
    assert effective_vocab_limit(ctllm) == 300 and effective_vocab_limit(ctllm, 250) == 250
    with pytest.raises(ValueError, match="vocab_limit"):
        effective_vocab_limit(cfg, 0)


def test_family_generation_defaults_are_the_released_ones():
    # spec §5 (Baichuan-13B-Chat generation_config.json) and §6.6 (Baichuan 2)
    assert FAMILY_DEFAULTS["baichuan"] == SamplingParams(temperature=0.3, top_k=5, top_p=0.85,
                                                         repetition_penalty=1.1, max_new_tokens=2048)
    assert FAMILY_DEFAULTS["baichuan2"] == SamplingParams(temperature=0.3, top_k=5, top_p=0.85,
                                                          repetition_penalty=1.05, max_new_tokens=2048)
    # Meta's chat_completion (llama/generation.py): temperature 0.6, top_p 0.9, no top-k or penalty
    llama = FAMILY_DEFAULTS["llama"]
    assert (llama.temperature, llama.top_p, llama.top_k, llama.repetition_penalty) == (0.6, 0.9, 0, 1.0)
    assert set(FAMILY_DEFAULTS) == {"llama", "baichuan", "baichuan2", "ziya", "ctllm"}


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
