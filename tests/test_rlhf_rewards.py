"""Llama 2's PPO reward (spec §11.2) against a NumPy reference: R_c = R_s if the prompt is tagged safety or
R_s < 0.15 else R_h on sigmoid scores, whitened after the logit, then R = R̃_c − β·KL; and the inputs it
reads (prompt safety tags, earlier rejection-sampling pools)."""
import json

import jax
import numpy as np
import pytest

from jaxllm.rlhf.objectives import kl_penalised_rewards, whiten_scores
from jaxllm.rlhf.prompts import read_pool, read_prompts
from jaxllm.rlhf.rewards import LLAMA2_SAFETY_THRESHOLD, combine_llama2, llama2_scorer, select_reward


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def reference(help_raw, safety_raw, tagged, beta, logp, ref_logp, mask, threshold=0.15):
    """The formulas in float64 NumPy: per-token rewards, R_c, and which model was used."""
    r_h, r_s = sigmoid(help_raw), sigmoid(safety_raw)
    use_safety = np.asarray(tagged, bool) | (r_s < threshold)
    r_c = np.where(use_safety, r_s, r_h)
    logit = np.log(r_c) - np.log1p(-r_c)
    whitened = (logit - logit.mean()) / np.sqrt(logit.var() + 1e-8)
    rewards = -beta * (logp - ref_logp) * mask
    last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)
    rewards[np.arange(len(last)), last] += whitened
    return rewards, r_c, use_safety, r_h, r_s


def test_combined_reward_whitened_after_the_logit_then_kl_equals_numpy():
    rng = np.random.default_rng(0)
    batch, seq, beta = 12, 9, 0.01
    help_raw = rng.normal(0, 3, batch).astype(np.float32)
    safety_raw = rng.normal(-1, 3, batch).astype(np.float32)  # some below logit(0.15) ≈ -1.73, some above
    tagged = np.zeros(batch, bool)
    tagged[[1, 4]] = True
    safety_raw[1] = 4.0  # a tagged prompt with a safe reply still takes R_s
    mask = np.zeros((batch, seq), np.float32)
    for i, n in enumerate(rng.integers(1, seq, batch)):
        mask[i, 1:1 + n] = 1
    logp, ref_logp = rng.normal(-2, 1, (2, batch, seq)).astype(np.float32)

    out = combine_llama2(help_raw, safety_raw, tagged.astype(np.float32))
    rewards, _ = kl_penalised_rewards(whiten_scores(out["score"]), logp, ref_logp, mask, beta)
    want, r_c, use_safety, r_h, r_s = reference(help_raw, safety_raw, tagged, beta, logp, ref_logp, mask)
    np.testing.assert_allclose(rewards, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sigmoid(out["score"]), r_c, rtol=1e-6)  # score = logit(R_c)
    np.testing.assert_array_equal(out["safety_used"], use_safety.astype(np.float32))
    np.testing.assert_allclose(out["reward_help"], r_h, rtol=1e-6)
    np.testing.assert_allclose(out["reward_safety"], r_s, rtol=1e-6)
    assert use_safety[1] and r_s[1] > 0.15  # the tag, not the threshold, picked R_s
    assert 0 < use_safety.sum() < batch  # both branches are exercised
    # logit(R_c) is the raw score itself: exact where a float32 sigmoid would round R_c to 1
    saturated = combine_llama2(np.float32([30.0, 2.0]), np.float32([25.0, 2.0]), np.float32([0, 0]))
    np.testing.assert_array_equal(saturated["score"], [30.0, 2.0])


def test_the_safety_threshold_is_strict_at_exactly_0_15_and_a_tag_overrides_it():
    t = np.float32(LLAMA2_SAFETY_THRESHOLD)
    below = np.nextafter(t, np.float32(0))
    safety_prob = np.float32([t, below, 0.9, 0.9, t])
    help_prob = np.float32([0.7, 0.7, 0.7, 0.7, 0.7])
    tagged = np.float32([0, 0, 0, 1, 1])
    r_c, use_safety = select_reward(help_prob, safety_prob, tagged)
    want_use = (tagged > 0) | (safety_prob < np.float32(0.15))  # NumPy, the same float32 comparison
    np.testing.assert_array_equal(use_safety, want_use)
    np.testing.assert_array_equal(use_safety, [False, True, False, True, True])  # R_s = 0.15 keeps R_h
    np.testing.assert_array_equal(r_c, np.where(want_use, safety_prob, help_prob))


def test_llama2_scorer_reads_both_models_and_the_rows_safety_tags():
    rows = {"safety": np.float32([0, 1, 0, 0])}
    helpful = lambda rows: np.float32([1.0, 1.0, 1.0, 1.0])
    safety = lambda rows: np.float32([3.0, 3.0, -3.0, -1.0])  # σ: 0.95, 0.95, 0.047, 0.27
    out = jax.device_get(llama2_scorer(helpful, safety)(rows))
    np.testing.assert_array_equal(out["safety_used"], [0, 1, 1, 0])
    np.testing.assert_array_equal(out["score"], [1.0, 3.0, -3.0, 1.0])


def test_prompts_carry_the_safety_tag_and_bad_lines_are_named(tmp_path):
    good = tmp_path / "p.jsonl"
    good.write_text('{"prompt": "hi"}\n\n{"prompt": "how to hurt", "safety": true}\n')
    assert read_prompts(good) == (["hi", "how to hurt"], [False, True])
    text = tmp_path / "p.txt"
    text.write_text("one\ntwo\n")
    assert read_prompts(text) == (["one", "two"], [False, False])
    for body, message in (('{"prompt": "x", "safety": "yes"}\n', r"p2.jsonl:1: 'safety' must be true or false"),
                          ('{"text": "x"}\n', r"p2.jsonl:1: expected \{\"prompt\""),
                          ('{"prompt": "x"}\n{oops\n', r"p2.jsonl:2: bad JSON")):
        bad = tmp_path / "p2.jsonl"
        bad.write_text(body)
        with pytest.raises(ValueError, match=message):
            read_prompts(bad)
    with pytest.raises(ValueError, match="no such prompts file"):
        read_prompts(tmp_path / "missing.jsonl")


def test_pool_files_are_read_once_per_reply_and_bad_records_are_named(tmp_path):
    record = lambda prompt, reply, **extra: json.dumps(
        {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}], **extra})
    first, second = tmp_path / "it1.jsonl", tmp_path / "it2.jsonl"
    first.write_text(record("p", "a", iteration=1, temperature=1.0, k=4) + "\n" + record("q", "b") + "\n")
    second.write_text(record("p", "a", iteration=2, from_iteration=1) + "\n" + record("p", "c", iteration=2) + "\n")
    pool = read_pool([first, second])
    assert [(e.prompt, e.reply, e.iteration) for e in pool] == [("p", "a", 1), ("q", "b", 1), ("p", "c", 2)]
    assert dict(pool[0].sampling) == {"temperature": 1.0, "k": 4}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(record("p", "a") + "\n" + json.dumps({"messages": [{"role": "user", "content": "p"}]}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected a rejection-sample record"):
        read_pool([bad])
    bad.write_text(record("p", "a", iteration=0) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: 'iteration' must be a positive integer"):
        read_pool([bad])
    with pytest.raises(ValueError, match="no such pool file"):
        read_pool([tmp_path / "missing.jsonl"])
