"""The continuous-batching engine and its asyncio loop, in process: requests that join and leave at
different steps get exactly the tokens `generate` gives them alone (RoPE on a data x tensor mesh, ALiBi +
NormHead on one device), a reused slot sees nothing of its last request, seeded sampling does not depend
on the neighbours, per-row sampling filters equal the single-setting ones, and the batcher's stop
strings, cancellation, timeouts, capacity and shutdown."""
import asyncio
import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import models, sharding
from jaxllm.inference import SamplingParams, generate
from jaxllm.inference.batcher import Batcher, Request, ServerFull
from jaxllm.inference.detokenize import TextStream
from jaxllm.inference.engine import Engine, SlotSampling, prefill_buckets
from jaxllm.inference.sampling import apply_repetition_penalty, filter_rows, filter_top_k, filter_top_p, sample_rows
from jaxllm.models import get_preset, init_params
from jaxllm.tokenizer import Tokenizer

DATA = Path(__file__).parent / "data"
# Lengths spread over the engine's prefill buckets (4, 8, 16) but within one of generate's (16): the
# references compile once.
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], [30], list(range(40, 52)), [3] * 16, [7, 1, 7]]


@pytest.fixture(scope="module")
def llama():
    """llama2-tiny on a data 2 x tensor 4 mesh: the cache's slots split over `data`, KV heads over `tensor`."""
    cfg = get_preset("llama2-tiny")
    params = init_params(cfg, jax.random.key(0))
    mesh = sharding.make_mesh(data=2, fsdp=1, tensor=4)
    engine = Engine(cfg, jax.device_put(params, models.param_shardings(cfg, mesh)), slots=4, max_len=64,
                    mesh=mesh, buckets=(4, 8, 16))
    return cfg, params, engine


def alone(cfg, params, prompt, n, **kw):
    return generate(cfg, params, [prompt], SamplingParams(temperature=0.0, max_new_tokens=n), **kw).tokens[0]


def run(engine, schedule, n):
    """Drive the engine by hand: schedule is [(step, slot, prompt, sampling)], each admitted before that
    decode step; every request gets n tokens or ends at a stop id. Returns the tokens per entry."""
    out = [[] for _ in schedule]
    owner = {}
    active = np.zeros(engine.slots, bool)
    remaining = np.zeros(engine.slots, np.int32)
    step = 0
    while step <= max(s for s, *_ in schedule) or active.any():
        for k, (at, slot, prompt, sampling) in enumerate(schedule):
            if at == step:
                assert not active[slot]
                out[k].append(engine.admit(slot, prompt, sampling))
                owner[slot], active[slot], remaining[slot] = k, True, n - 1
        if active.any():
            tokens, valid = engine.step(active, remaining)
            for t, v in zip(tokens, valid):
                for slot in np.flatnonzero(v):
                    out[owner[slot]].append(int(t[slot]))
                    remaining[slot] -= 1
                    if int(t[slot]) in schedule[owner[slot]][3].stop_ids:
                        remaining[slot] = 0
            active &= remaining > 0
        step += 1
    return out


def test_requests_joining_and_leaving_get_the_tokens_they_get_alone(llama):
    cfg, params, engine = llama
    greedy = SlotSampling()
    # two start, two join three steps later, slot 0 is reused (by a prompt in another bucket) after it left
    schedule = [(0, 0, PROMPTS[0], greedy), (0, 1, PROMPTS[1], greedy), (3, 2, PROMPTS[2], greedy),
                (3, 3, PROMPTS[3], greedy), (12, 0, PROMPTS[4], greedy), (13, 1, PROMPTS[5], greedy)]
    got = run(engine, schedule, 10)
    for (_, _, prompt, _), tokens in zip(schedule, got):
        assert tokens == alone(cfg, params, prompt, 10)
    assert engine.bucket_for(5) == 8 and engine.buckets == (4, 8, 16)
    assert prefill_buckets(63) == (16, 32, 63) and prefill_buckets(16) == (16,) and prefill_buckets(9) == (9,)


def test_alibi_normhead_engine_on_one_device():
    cfg = get_preset("baichuan2-13b-tiny")
    params = init_params(cfg, jax.random.key(0))
    engine = Engine(cfg, params, slots=2, max_len=40, buckets=[16])
    schedule = [(0, 0, PROMPTS[3], SlotSampling()), (2, 1, PROMPTS[1], SlotSampling()),
                (12, 0, PROMPTS[0], SlotSampling())]
    for (_, _, prompt, _), tokens in zip(schedule, run(engine, schedule, 12)):
        assert tokens == alone(cfg, params, prompt, 12)
    # a stop id ends the slot on the device, and the stop id is its last token
    free = alone(cfg, params, PROMPTS[1], 12)
    stopped = run(engine, [(0, 1, PROMPTS[1], SlotSampling(stop_ids=(free[4],)))], 12)[0]
    assert stopped == free[:free.index(free[4]) + 1]
    with pytest.raises(ValueError, match="at most 16"):
        engine.admit(0, list(range(17)), SlotSampling())


def test_seeded_sampling_does_not_depend_on_the_neighbours(llama):
    cfg, _, engine = llama
    hot = SlotSampling(temperature=1.0, top_k=50, top_p=0.9, repetition_penalty=1.2, seed=7)
    solo = run(engine, [(0, 3, PROMPTS[0], hot)], 12)[0]
    crowded = run(engine, [(0, 0, PROMPTS[1], SlotSampling(temperature=0.7, seed=1)), (0, 1, PROMPTS[0], hot),
                           (0, 2, PROMPTS[2], SlotSampling())], 12)[1]
    assert crowded == solo
    other = run(engine, [(0, 1, PROMPTS[0], dataclasses.replace(hot, subseed=1))], 12)[0]
    assert other != solo
    assert all(0 <= t < cfg.vocab_size for t in solo)


def test_per_row_filters_equal_the_single_setting_ones():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(5, 64)).astype(np.float32) * 3)
    top_k, top_p = np.array([0, 5, 0, 3, 64]), np.array([1.0, 1.0, 0.6, 0.5, 0.05], np.float32)
    filtered = np.asarray(jax.jit(filter_rows)(logits, jnp.asarray(top_k), jnp.asarray(top_p)))
    draw = jax.jit(sample_rows, static_argnames="vocab_limit")
    for row in range(5):
        expected = filter_top_p(filter_top_k(logits[row:row + 1], int(top_k[row])), float(top_p[row]))
        np.testing.assert_array_equal(np.isfinite(filtered[row]), np.isfinite(np.asarray(expected)[0]))
    seen = jnp.asarray(rng.random((5, 64)) < 0.3)
    penalty = jnp.asarray([1.0, 1.3, 1.0, 1.3, 1.0])
    keys = jax.random.split(jax.random.key(0), 5)
    greedy = draw(logits, keys, jnp.zeros(5), jnp.zeros(5, jnp.int32), jnp.ones(5), penalty, seen)
    penalised = apply_repetition_penalty(logits, seen, 1.3)
    expected = np.where(np.asarray(penalty) != 1.0, np.argmax(penalised, -1), np.argmax(logits, -1))
    np.testing.assert_array_equal(greedy, expected)
    # one hot row among greedy ones: only it is drawn, from its own key, and never outside its top-k
    temperature = jnp.asarray([0.0, 1.0, 0.0, 0.0, 0.0])
    draws = {int(draw(logits, jax.random.split(jax.random.key(s), 5), temperature,
                      jnp.asarray(top_k), jnp.ones(5), jnp.ones(5), seen)[1]) for s in range(20)}
    assert draws <= set(np.argsort(-np.asarray(logits[1]))[:5].tolist()) and len(draws) > 1
    assert draw(logits, keys, temperature, jnp.asarray(top_k), jnp.ones(5), jnp.ones(5), seen,
                vocab_limit=10).max() < 10


def test_text_stream_holds_back_partial_characters_and_stop_strings():
    tok = Tokenizer.load(DATA / "llama2-32k.model")
    text = "你好，世界! Hello there, general Kenobi."
    ids = tok.encode(text)
    stream = TextStream(tok.decode)
    pieces = [stream.add(i) for i in ids] + [stream.finish()]
    assert "".join(pieces) == tok.decode(ids) and all("\ufffd" not in p for p in pieces)
    stream = TextStream(tok.decode, ["general", "there,"])
    shown = ""
    for i in ids:
        shown += stream.add(i)
        assert "ther" not in shown  # nothing that may begin a stop string is shown early
        if stream.stopped:
            break
    assert shown + stream.finish() == "你好，世界! Hello " and stream.stopped
    # a completion continues its prompt: the first word keeps its leading space
    prompt = tok.encode("Once upon")
    stream = TextStream(tok.decode, context=prompt)
    assert "".join(stream.add(i) for i in tok.encode("Once upon a time")[len(prompt):]) == " a time"


def test_batcher_stop_strings_cancellation_timeouts_capacity_and_shutdown(llama):
    cfg, params, engine = llama
    text_of = lambda ids: "".join(f"<{i}>" for i in ids)  # token boundaries are unambiguous
    free = alone(cfg, params, PROMPTS[0], 12)

    async def scenario():
        batcher = Batcher(engine, text_of, max_requests=6)
        batcher.start()
        stop = text_of(free[3:5])
        cut = await batcher.submit(Request(PROMPTS[0], 12, stop_strings=(stop,))).result()
        assert (cut.text, cut.finish_reason, cut.tokens) == (text_of(free[:3]), "stop", 5)
        whole = await batcher.submit(Request(PROMPTS[0], 12)).result()
        assert (whole.text, whole.finish_reason, whole.tokens) == (text_of(free), "length", 12)
        # six long requests fill 4 slots and the queue; a seventh is refused
        streams = [batcher.submit(Request(PROMPTS[k % 3], 50, SlotSampling(stop_ids=()))) for k in range(6)]
        with pytest.raises(ServerFull, match="at capacity"):
            batcher.submit(Request(PROMPTS[0], 5))
        first = await streams[0].__aiter__().__anext__()
        for _ in range(100):  # admissions take a prefill each
            if batcher.stats()["running"] == 4:
                break
            await asyncio.sleep(0.02)
        assert first.tokens >= 1 and batcher.stats() == {"slots": 4, "running": 4, "waiting": 2,
                                                         "ended": {"stop": 1, "length": 1}}
        for stream in streams[1:]:
            stream.cancel()  # as a client that went away: their slots and places are freed
        for _ in range(100):
            if batcher.stats()["running"] + batcher.stats()["waiting"] <= 1:
                break
            await asyncio.sleep(0.02)
        assert batcher.stats()["waiting"] == 0 and batcher.stats()["running"] <= 1
        assert [(await s.result()).finish_reason for s in streams[1:]] == ["cancelled"] * 5
        assert batcher.stats()["ended"]["cancelled"] == 5
        late = await batcher.submit(Request(PROMPTS[1], 50, timeout=0.0)).result()
        assert late.finish_reason == "timeout" and "timed out" in late.error
        with pytest.raises(ValueError, match="at most 16"):
            batcher.submit(Request(list(range(17)), 5))
        # shutdown refuses new work but finishes what it took
        pending = batcher.submit(Request(PROMPTS[2], 8))
        closing = asyncio.ensure_future(batcher.shutdown())
        await asyncio.sleep(0)
        with pytest.raises(ServerFull, match="shutting down"):
            batcher.submit(Request(PROMPTS[0], 5))
        assert (await pending.result()).tokens == 8
        assert (await streams[0].result()).finish_reason == "length"
        await closing

    asyncio.run(scenario())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama2-tiny", "baichuan-tiny", "baichuan-13b-tiny", "baichuan2-tiny",
                                  "ctllm-tiny", "ziya-tiny"])
def test_every_family_decodes_in_slots_as_generate_does(name):
    """Each family's engine (RoPE/ALiBi, NormHead, padded vocabularies) joins and reuses slots and still
    gives each greedy request generate's tokens."""
    cfg = get_preset(name)
    params = init_params(cfg, jax.random.key(1))
    engine = Engine(cfg, params, slots=3, max_len=48, buckets=(8, 16))
    greedy = SlotSampling()
    schedule = [(0, 0, PROMPTS[0], greedy), (1, 1, PROMPTS[3], greedy), (2, 2, PROMPTS[2], greedy),
                (15, 0, PROMPTS[4], greedy), (16, 2, PROMPTS[5], greedy)]
    for (_, _, prompt, _), tokens in zip(schedule, run(engine, schedule, 14)):
        assert tokens == alone(cfg, params, prompt, 14)
        assert max(tokens) < cfg.num_pieces  # padded embedding rows are never sampled


def test_scores_are_the_full_forwards_on_a_mesh(llama):
    """The prompt's Scores from the prefill that fills the slot, and each decoded token's from the logits
    it was sampled from, equal log_softmax of a full forward (slots on a data x tensor mesh)."""
    from jaxllm.inference.engine import TOP_LOGPROBS
    from jaxllm.models import forward

    cfg, params, engine = llama
    full = lambda ids: np.asarray(jax.nn.log_softmax(forward(cfg, params, jnp.asarray([ids]))[0], axis=-1))
    prompt = PROMPTS[3]
    token, first, scores = engine.admit_scored(1, prompt, SlotSampling(), score_prompt=True)
    reference = full(prompt)
    assert len(scores) == len(prompt) - 1 and scores.top_ids.shape == (len(prompt) - 1, TOP_LOGPROBS)
    np.testing.assert_allclose(scores.logprob, [reference[j - 1, prompt[j]] for j in range(1, len(prompt))], atol=1e-4)
    np.testing.assert_array_equal(scores.top_ids[:, 0], reference[:-1].argmax(-1))
    np.testing.assert_allclose(scores.top_logprobs, -np.sort(-reference[:-1], axis=-1)[:, :TOP_LOGPROBS], atol=1e-4)
    assert token == reference[-1].argmax() and abs(first.logprob[0] - reference[-1, token]) < 1e-4
    active, remaining = np.zeros(engine.slots, bool), np.zeros(engine.slots, np.int32)
    active[1], remaining[1] = True, 1
    tokens, valid, step = engine.step_scored(active, remaining)
    reference = full(prompt + [token])[-1]
    assert valid[0, 1] and tokens[0, 1] == reference.argmax()
    assert abs(step.logprob[0, 1] - reference.max()) < 1e-4 and step.top_ids[0, 1, 0] == reference.argmax()
    # unscored calls give the same tokens
    assert engine.admit(1, prompt, SlotSampling()) == token


def test_token_texts_give_each_token_its_string_bytes_and_offset():
    """A byte-fallback piece past ASCII shows as `bytes:\\xNN` (its character joins the text with the last
    byte); every token's bytes together are the text's UTF-8; offsets count the text before each token."""
    from jaxllm.inference.detokenize import TokenTexts

    tok = Tokenizer.load(DATA / "llama2-32k.model")
    text = "月光😀 ok\n"
    ids = tok.encode(text)
    texts = TokenTexts(tok)
    out = [texts.add(i) for i in ids]
    assert texts.text == text == tok.decode(ids)
    assert [s for s, _, _ in out] == ["", "月", "光", "bytes:\\xf0", "bytes:\\x9f", "bytes:\\x98", "bytes:\\x80",
                                      " ok", "\n"]
    assert bytes(b for _, bs, _ in out for b in bs) == text.encode()
    assert [o for _, _, o in out] == [0, 0, 1, 2, 2, 2, 2, 3, 6]
    assert TokenTexts(tok, context=ids[:3]).string(ids[7]) == " ok"  # an alternative after a context
