"""Rejection sampling and PPO on a tiny model with a synthetic reward, and the commands end to end."""
import json

import jax
import numpy as np
import pytest

from jaxllm.inference import SamplingParams
from jaxllm.models import get_preset, init_params
from jaxllm.rlhf.ppo import PPOConfig, ppo
from jaxllm.rlhf.rejection import best_of_k, keep_best, reward_vs_k, score_replies

TARGET = 5


def count_target(rows):
    """+1 per occurrence of TARGET among the response tokens."""
    return ((rows["targets"] == TARGET) * rows["response_mask"]).sum(axis=1).astype(np.float32)


@pytest.fixture(scope="module")
def policy():
    cfg = get_preset("llama2-tiny", vocab_size=32)
    return cfg, init_params(cfg, jax.random.key(0))


PROMPTS = [[1, 7, 9], [1, 3], [1, 11, 12, 13], [1, 2]]


def test_rejection_sampling_keeps_the_argmax_reward_sample(policy):
    cfg, params = policy
    sampling = SamplingParams(temperature=1.0, max_new_tokens=8)
    results = best_of_k(cfg, params, PROMPTS, count_target, k=6, sampling=sampling, rng=jax.random.key(1))
    assert len(results) == len(PROMPTS)
    for prompt, (ids, best, scores) in zip(PROMPTS, results):
        assert best == max(scores) and len(scores) == 6
        assert best == sum(t == TARGET for t in ids)  # the kept sample really has that reward
    table = reward_vs_k([s for _, _, s in results])
    assert [r["k"] for r in table] == list(range(1, 7))
    assert all(a["max"] <= b["max"] for a, b in zip(table, table[1:]))  # best-of-k never decreases with k


def test_rejection_sampling_keeps_only_samples_it_can_render(policy):
    cfg, params = policy
    sampling = SamplingParams(temperature=1.0, max_new_tokens=8)
    # refuse exactly the samples the reward prefers
    render = lambda i, ids: None if TARGET in ids else (PROMPTS[i], ids)
    results = best_of_k(cfg, params, PROMPTS, count_target, k=6, sampling=sampling, rng=jax.random.key(1),
                        render=render)
    for ids, best, scores in results:
        if ids is None:
            assert np.isnan(best)
            continue
        assert TARGET not in ids and best == 0.0
    nothing = best_of_k(cfg, params, PROMPTS[:1], count_target, k=2, sampling=sampling, rng=jax.random.key(1),
                        render=lambda i, ids: None)
    assert nothing[0][0] is None and len(nothing[0][2]) == 2
    # what is scored is the rendered reply: here one more TARGET than sampled
    plus_one = best_of_k(cfg, params, PROMPTS, count_target, k=6, sampling=sampling, rng=jax.random.key(1),
                         render=lambda i, ids: (PROMPTS[i], list(ids) + [TARGET]))
    first = best_of_k(cfg, params, PROMPTS, count_target, k=6, sampling=sampling, rng=jax.random.key(1))
    assert [b for _, b, _ in plus_one] == [b + 1 for _, b, _ in first]


def test_pooled_rejection_sampling_keeps_the_max_across_iterations(policy):
    """Llama 2 after RLHF-V3: each iteration's best competes with the best of every earlier iteration,
    re-scored by the current reward; here three iterations (the CLI test varies the temperature)."""
    cfg, params = policy
    pool_prompts, pool_replies, pool_of, best_so_far = [], [], [[] for _ in PROMPTS], None
    sampling = SamplingParams(temperature=1.0, max_new_tokens=8)
    for iteration in (1, 2, 3):
        new = best_of_k(cfg, params, PROMPTS, count_target, k=6, sampling=sampling, rng=jax.random.key(iteration))
        pool_scores = score_replies(count_target, pool_prompts, pool_replies)
        kept = keep_best(new, pool_of, pool_scores)
        if best_so_far is None:
            assert [c.score for c in kept] == [b for _, b, _ in new] and all(c.pooled is None for c in kept)
        else:  # the max over every iteration so far, wherever it came from
            np.testing.assert_array_equal([c.score for c in kept], np.maximum(best_so_far, [b for _, b, _ in new]))
            for c, b in zip(kept, new):
                assert (c.pooled is not None) == (c.score > b[1])  # a tie keeps the new sample
                if c.pooled is not None:  # the kept pooled reply really has that score
                    assert c.score == sum(t == TARGET for t in pool_replies[c.pooled])
        best_so_far = [c.score for c in kept]
        for i, (ids, _, _) in enumerate(new):  # this iteration's best joins the pool
            pool_of[i].append(len(pool_replies))
            pool_prompts.append(PROMPTS[i])
            pool_replies.append(ids)
        latest = slice(len(pool_replies) - len(PROMPTS), None)  # re-scoring reproduces the score
        np.testing.assert_array_equal(score_replies(count_target, pool_prompts[latest], pool_replies[latest]),
                                      [b for _, b, _ in new])
    assert any(c.pooled is not None for c in kept)  # an earlier iteration's reply survived


def test_rows_carry_the_final_token_where_the_reward_model_reads_it():
    from jaxllm.rlhf.rewards import reward_model_scorer
    from jaxllm.rlhf.rollout import response_rows
    from jaxllm.stages import reward

    rows = response_rows([[1, 7, 9], [1, 3]], [[4, 5, 2], [6]], length=8)
    np.testing.assert_array_equal(rows["tokens"], [[1, 7, 9, 4, 5, 2, 0, 0], [1, 3, 6, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(rows["last"], [5, 2])  # the final (EOS) token, as in RM training rows
    np.testing.assert_array_equal(rows["targets"][0, :5], [7, 9, 4, 5, 2])
    np.testing.assert_array_equal(rows["response_mask"], [[0, 0, 1, 1, 1, 0, 0, 0], [0, 1, 0, 0, 0, 0, 0, 0]])
    # so a reward model's score depends on the final token: replies differing only there score differently
    cfg = get_preset("llama2-tiny", vocab_size=32)
    rm = reward.from_lm_params(init_params(cfg, jax.random.key(0)), cfg, jax.random.key(1))
    scores = reward_model_scorer(cfg, rm)(response_rows([[1, 7], [1, 7]], [[4, 5, 2], [4, 5, 6]], length=6))
    assert abs(scores[0] - scores[1]) > 1e-4


def run(policy, beta, iterations=8):
    cfg, params = policy
    ppo_cfg = PPOConfig(iterations=iterations, batch_size=16, minibatch_size=8, epochs=2, lr=1e-2, beta=beta,
                        max_new_tokens=12, whiten_scores=False, weight_decay=0.0)
    _, _, history = ppo(cfg, params, PROMPTS, count_target, ppo_cfg, log=lambda *_: None)
    return history


def test_ppo_raises_a_synthetic_reward_and_a_large_beta_holds_the_policy_at_the_reference(policy):
    free = run(policy, beta=0.0)
    early = np.mean([h["reward"] for h in free[:2]])
    late = np.mean([h["reward"] for h in free[-2:]])
    print(f"\n  PPO synthetic reward (+1 per token {TARGET}): {early:.2f} → {late:.2f} per response")
    assert late > early + 0.5
    held = run(policy, beta=50.0)
    assert max(h["kl"] for h in held[1:]) < 0.5 * max(h["kl"] for h in free[1:])
    assert np.mean([h["reward"] for h in held[-2:]]) < late
    for key in ("reward", "kl", "clip_fraction", "value_loss", "response_length"):
        assert all(np.isfinite(h[key]) for h in free)


def test_ppo_with_two_reward_models_reports_which_one_scored_each_batch(policy):
    from jaxllm.rlhf.rewards import llama2_scorer

    cfg, params = policy
    tagged = [False, True, False, False]  # PROMPTS[1] is a safety prompt: 4 of every 16 rollouts
    seen = []

    def helpful(rows):  # R_h = the synthetic count; the rows' tags recorded alongside
        scores = count_target(rows)
        seen.append((np.asarray(scores), np.asarray(rows["safety"])))
        return scores

    safe = lambda rows: 3.0 + 0.0 * rows["safety"]  # σ(3) = 0.95: above 0.15, so used only where tagged
    ppo_cfg = PPOConfig(iterations=2, batch_size=16, minibatch_size=8, epochs=2, lr=1e-2, beta=0.0,
                        max_new_tokens=12, whiten_scores=False, weight_decay=0.0)
    _, _, history = ppo(cfg, params, PROMPTS, llama2_scorer(helpful, safe), ppo_cfg, safety=tagged,
                        log=lambda *_: None)
    sigmoid = lambda x: 1 / (1 + np.exp(-np.asarray(x, np.float64)))
    for h, (counts, tags) in zip(history, seen, strict=True):
        np.testing.assert_array_equal(tags, np.tile(tagged, 4))
        assert h["safety_used"] == 0.25
        assert h["reward"] == pytest.approx(np.mean(np.where(tags > 0, 3.0, counts)), rel=1e-6)  # logit(R_c)
        assert h["reward_help"] == pytest.approx(np.mean(sigmoid(counts)), rel=1e-5)
        assert h["reward_safety"] == pytest.approx(sigmoid(3.0), rel=1e-6)
    with pytest.raises(ValueError, match="3 safety tags for 4 prompts"):
        ppo(cfg, params, PROMPTS, count_target, ppo_cfg, safety=tagged[:3])


def test_ppo_shards_over_eight_devices_like_one(policy):
    from jaxllm.sharding import make_mesh

    cfg, params = policy
    ppo_cfg = PPOConfig(iterations=2, batch_size=16, minibatch_size=8, epochs=2, lr=1e-2, beta=0.1,
                        max_new_tokens=12, whiten_scores=False, weight_decay=0.0)
    one = ppo(cfg, params, PROMPTS, count_target, ppo_cfg, log=lambda *_: None)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    eight = ppo(cfg, params, PROMPTS, count_target, ppo_cfg, mesh=mesh, log=lambda *_: None)
    shardings = [x.sharding for x in jax.tree.leaves(eight[:2])]
    assert all(s.mesh.devices.size == 8 for s in shardings)
    assert any("fsdp" in str(s.spec) for s in shardings) and any("tensor" in str(s.spec) for s in shardings)
    assert [h["reward"] for h in one[2]] == [h["reward"] for h in eight[2]]  # the same samples
    for x, y in zip(jax.tree.leaves(one[:2]), jax.tree.leaves(eight[:2]), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)


def test_ppo_samples_its_rollouts_in_parts_as_it_samples_them_together(policy):
    """generation_chunks bounds the prefill's memory (each part's KV cache is freed before the next):
    greedy rollouts sampled in two parts are the ones sampled at once, and so is the run."""
    cfg, params = policy
    settings = dict(iterations=2, batch_size=16, minibatch_size=8, epochs=1, lr=1e-2, beta=0.1, temperature=0.0,
                    max_new_tokens=12, whiten_scores=False, weight_decay=0.0)
    whole = ppo(cfg, params, PROMPTS, count_target, PPOConfig(**settings), log=lambda *_: None)
    parts = ppo(cfg, params, PROMPTS, count_target, PPOConfig(**settings, generation_chunks=2), log=lambda *_: None)
    for key in ("reward", "response_length"):
        assert [h[key] for h in whole[2]] == [h[key] for h in parts[2]], key
    assert [h["kl"] for h in whole[2]] == pytest.approx([h["kl"] for h in parts[2]], rel=1e-4, abs=1e-6)
    for x, y in zip(jax.tree.leaves(whole[:2]), jax.tree.leaves(parts[:2]), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)


def test_ppo_resumes_a_killed_run_exactly_and_logs_each_iteration_once(policy, tmp_path):
    cfg, params = policy
    ppo_cfg = PPOConfig(iterations=4, batch_size=16, minibatch_size=8, epochs=2, lr=1e-2, beta=0.1,
                        max_new_tokens=12, whiten_scores=False, weight_decay=0.0, save_every=2)
    straight = ppo(cfg, params, PROMPTS, count_target, ppo_cfg, run_dir=tmp_path / "straight", log=lambda *_: None)

    def crash(metrics):
        if metrics["iteration"] == 3:  # logged, but its checkpoint (at 4) never written
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        ppo(cfg, params, PROMPTS, count_target, ppo_cfg, run_dir=tmp_path / "run", on_iteration=crash,
            log=lambda *_: None)
    lines = (tmp_path / "run" / "ppo_metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [1, 2, 3]
    messages = []
    resumed = ppo(cfg, params, PROMPTS, count_target, ppo_cfg, run_dir=tmp_path / "run", log=messages.append)
    assert "resumed PPO at iteration 2" in messages
    for x, y in zip(jax.tree.leaves(straight[:2]), jax.tree.leaves(resumed[:2]), strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    logged = [json.loads(line) for line in (tmp_path / "run" / "ppo_metrics.jsonl").read_text().splitlines()]
    assert [h["iteration"] for h in logged] == [1, 2, 3, 4]  # iteration 3, redone, is logged once
    assert [h["reward"] for h in logged] == [h["reward"] for h in straight[2]]
    assert [h["iteration"] for h in resumed[2]] == [1, 2, 3, 4]


def test_ppo_config_errors():
    from jaxllm.config import ConfigError
    with pytest.raises(ConfigError, match="not a multiple of ppo.minibatch_size"):
        PPOConfig(batch_size=10, minibatch_size=4).validate()
    from jaxllm.rlhf.ppo import Layout
    from jaxllm.sharding import make_mesh
    with pytest.raises(ConfigError, match=r"ppo.minibatch_size=4 rows are not divisible by mesh data×fsdp=8"):
        Layout.check_batch(PPOConfig(batch_size=8, minibatch_size=4), make_mesh(1, -1, 1))
    with pytest.raises(ConfigError, match="ppo.batch_size=16 is not a multiple of ppo.generation_chunks=3"):
        PPOConfig(batch_size=16, minibatch_size=8, generation_chunks=3).validate()
    with pytest.raises(ConfigError, match=r"ppo.batch_size/ppo.generation_chunks=4 rows are not divisible by mesh "
                                          r"data×fsdp=8"):
        Layout.check_batch(PPOConfig(batch_size=8, minibatch_size=8, generation_chunks=2), make_mesh(1, -1, 1))


def test_ppo_and_rejection_recipes():
    from jaxllm.rlhf.cli import load_recipe

    seven = load_recipe("ppo", "llama2-7b-ppo")
    p = seven.ppo
    # spec §3.3: β 0.01 (7B/13B), clip 0.2, constant LR 1e-6 (PPO has no schedule), AdamW (0.9, 0.95) ε 1e-5,
    # weight decay 0.1, grad clip 1, batch 512, minibatches of 64 with one step each
    assert (p.beta, p.clip, p.lr, p.b1, p.b2, p.eps, p.weight_decay, p.clip_norm) == (
        0.01, 0.2, 1e-6, 0.9, 0.95, 1e-5, 0.1, 1.0)
    assert (p.batch_size, p.minibatch_size, p.epochs) == (512, 64, 1) and 200 <= p.iterations <= 400
    assert load_recipe("ppo", "llama2-70b-ppo").ppo.beta == 0.005
    demo = load_recipe("ppo", "ppo-demo", ["ppo.iterations=3", "policy=x"])
    assert demo.ppo.iterations == 3 and demo.policy == "x" and demo.prompts.startswith("assets:")
    assert load_recipe("rejection", "rejection-demo").rejection.k == 4
    # Llama 2's reward: the 7B and 70B recipes name a helpfulness and a safety reward model
    for name in ("llama2-7b-ppo", "llama2-70b-ppo"):
        recipe = load_recipe("ppo", name)
        assert recipe.reward_model.endswith("-rm-helpful") and recipe.safety_reward_model.endswith("-rm-safety")
        assert recipe.ppo.safety_threshold == 0.15 and recipe.ppo.generation == "gathered"
    assert load_recipe("rejection", "rejection-demo", ["pool=[a.jsonl, b.jsonl]"]).pool == ["a.jsonl", "b.jsonl"]
    from jaxllm.config import ConfigError
    with pytest.raises(ConfigError, match="unknown config key 'ppo.itertions'.*did you mean 'ppo.iterations'"):
        load_recipe("ppo", "ppo-demo", ["ppo.itertions=2"])
    with pytest.raises(ConfigError, match="rejection-demo.yaml: unknown key 'output' for jaxllm ppo"):
        load_recipe("ppo", "rejection-demo")
    with pytest.raises(ConfigError, match="ppo.lr must be float, got 'fast'"):
        load_recipe("ppo", "ppo-demo", ["ppo.lr=fast"])
    with pytest.raises(ConfigError, match=r"ppo.generation must be one of \('gathered', 'sharded'\), got 'fast'"):
        load_recipe("ppo", "ppo-demo", ["ppo.generation=fast"])
    with pytest.raises(ConfigError, match=r"ppo.safety_threshold is a sigmoid score in \(0, 1\), got 15"):
        load_recipe("ppo", "ppo-demo", ["ppo.safety_threshold=15"])
    with pytest.raises(ConfigError, match=r"distributed must be one of \('auto', 'yes', 'no'\), got 'maybe'"):
        load_recipe("rejection", "rejection-demo", ["distributed=maybe"])
    with pytest.raises(ConfigError, match="unknown key 'pool' for jaxllm ppo"):
        load_recipe("ppo", "ppo-demo", ["pool=[a.jsonl]"])
    with pytest.raises(ConfigError, match="pool must be a list of files"):
        load_recipe("rejection", "rejection-demo", ["pool=[{a: 1}]"])


def test_rejection_output_skips_blank_replies_and_scores_the_rendered_conversation(tmp_path):
    from pathlib import Path

    from jaxllm.rlhf.cli import reply_ids, sft_record, write_sft
    from jaxllm.stages.data import reply_text as usable_reply
    from jaxllm.tokenizer import Tokenizer, get_chat_template

    tok = Tokenizer(Path(__file__).parent / "data" / "llama2-32k.model")
    template = get_chat_template("llama2-chat")
    blank, tagged, good = [29871, 2], tok.encode(" [INST] hi") + [2], tok.encode("Hello!") + [2]
    assert usable_reply(blank, tok, template) is None and usable_reply(tagged, tok, template) is None
    assert usable_reply(good, tok, template) == "Hello!"
    # what a reward model and SFT see: the conversation the template renders, prompt ids then reply ids
    prompt, reply = reply_ids(tok, template, "b", "Hello!")
    rendered, _ = template.render(tok, [{"role": "user", "content": "b"}, {"role": "assistant", "content": "Hello!"}])
    assert prompt + reply == rendered and prompt == template.prompt(tok, [{"role": "user", "content": "b"}])
    assert reply[-1] == tok.eos_id
    out = tmp_path / "best.jsonl"
    write_sft(out, [sft_record("b", "Hello!", 2.0, iteration=1)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [{"messages": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "Hello!"}],
                     "reward": 2.0, "iteration": 1}]
    assert [p.name for p in tmp_path.iterdir()] == ["best.jsonl"]  # written through a temporary, replaced


def test_rm_rejection_sample_and_ppo_commands(tmp_path, capsys):
    import shutil
    from pathlib import Path

    import yaml

    from jaxllm.checkpoint import load_params, save_params
    from jaxllm.cli import main as cli
    from jaxllm.stages import reward
    from jaxllm.stages.data import encode_sft
    from jaxllm.stages.stages import load_stage_recipe, reward_accuracy, rm_stage
    from jaxllm.tokenizer import Tokenizer, get_chat_template

    assets = Path(__file__).resolve().parent.parent / "jaxllm" / "assets"
    cfg = get_preset("llama2-tiny", vocab_size=4096)
    policy_dir = tmp_path / "policy"
    save_params(policy_dir, jax.tree.map(np.asarray, init_params(cfg, jax.random.key(3))), cfg)
    shutil.copy(assets / "demo" / "tokenizer.model", policy_dir / "tokenizer.model")
    recipe = tmp_path / "rm.yaml"
    recipe.write_text(yaml.safe_dump({
        "run_dir": str(tmp_path / "rm"), "init_from": str(policy_dir), "model": {"preset": "llama2-tiny", "vocab_size": 4096},
        "data": {"sources": [{"path": str(assets / "stages" / "rm_sample.jsonl")}],
                 "tokenizer": str(assets / "demo" / "tokenizer.model"), "seq_len": 64},
        "optimizer": {"warmup_steps": 0}, "train": {"steps": 2, "batch_size": 8},
        "log": {"progress": False, "tensorboard": False, "plot": False}}))
    assert cli(["rm", str(recipe)]) == 0
    printed = capsys.readouterr().out
    # eval.json holds the held-out accuracy of the saved reward model, recomputed here from its checkpoint
    evaluation = json.loads((tmp_path / "rm" / "eval.json").read_text())
    config, options = load_stage_recipe(str(recipe))
    _, held_out = rm_stage(config, options, log=lambda *_: None)
    rm_config, rm_params = reward.load(tmp_path / "rm")
    assert evaluation["heldout_pairs"] == len(held_out["tokens"]) == 4  # 10 % of the 40 pairs
    assert evaluation["heldout_accuracy"] == reward_accuracy(rm_config, rm_params, held_out)
    assert f"held-out accuracy {evaluation['heldout_accuracy']:.3f} on 4 pairs" in printed

    out = tmp_path / "best.jsonl"
    assert cli(["rejection-sample", "--policy", str(policy_dir), "--reward-model", str(tmp_path / "rm"), "--k", "2",
                "--max-new-tokens", "4", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "mean max reward" in printed
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert f"wrote {len(rows)} best-of-2 examples" in printed and 0 < len(rows) <= 12
    assert all(r["messages"][1]["role"] == "assistant" and r["messages"][1]["content"].strip() for r in rows)
    # consumable by `jaxllm sft`: its encoder takes every line
    examples, stats = encode_sft([out], Tokenizer.load(policy_dir), get_chat_template("llama2-chat"), seq_len=256,
                                 on_error="raise")
    assert len(examples) == len(rows) and stats.skipped == 0
    # iteration 2 pools iteration 1's replies: re-scored by the same reward model they keep their reward,
    # and each prompt keeps the better of the two iterations
    again = tmp_path / "best2.jsonl"
    assert cli(["rejection-sample", "--policy", str(policy_dir), "--reward-model", str(tmp_path / "rm"), "--k", "2",
                "--max-new-tokens", "4", "--seed", "5", "--temperature", "0.7", "--pool", str(out), "-o",
                str(again)]) == 0
    printed = capsys.readouterr().out
    assert f"pool: {len(rows)} earlier replies re-scored" in printed and "(iteration 2)" in printed
    first = {r["messages"][0]["content"]: r for r in rows}
    second = [json.loads(line) for line in again.read_text().splitlines()]
    assert {r["messages"][0]["content"] for r in second} >= set(first)
    for r in second:
        before = first.get(r["messages"][0]["content"])
        assert r["iteration"] == 2 and r["from_iteration"] in (1, 2)
        if before is not None:
            assert r["reward"] >= before["reward"] - 1e-5
            if r["from_iteration"] == 1:  # the pooled reply, unchanged, with the temperature it was sampled at
                assert r["messages"] == before["messages"] and r["temperature"] == 1.0
                assert r["reward"] == pytest.approx(before["reward"], abs=1e-5)
    assert cli(["rejection-sample", "--policy", str(policy_dir), "--reward-model", str(tmp_path / "rm"),
                "--pool", str(tmp_path / "missing.jsonl"), "-o", str(again)]) == 2
    assert "missing.jsonl: no such pool file" in capsys.readouterr().err

    # two reward models (here the same one twice): Llama 2's combined score, R_h and R_s in the metrics
    ppo_args = ["ppo", "ppo-demo", "--policy", str(policy_dir), "--reward-model", str(tmp_path / "rm"),
                "--safety-reward-model", str(tmp_path / "rm"), "--run-dir", str(tmp_path / "ppo"), "ppo.iterations=2",
                "ppo.batch_size=4", "ppo.minibatch_size=2",
                "ppo.max_new_tokens=4", "ppo.lr=1e-4", "mesh.fsdp=1", "mesh.tensor=8"]  # tensor-parallel policy
    assert cli(ppo_args) == 0
    logged = [json.loads(line) for line in (tmp_path / "ppo" / "ppo_metrics.jsonl").read_text().splitlines()]
    assert len(logged) == 2
    for m in logged:
        assert {"reward_help", "reward_safety", "safety_used"} <= set(m)
        assert m["reward_help"] == pytest.approx(m["reward_safety"])  # the same model twice
    assert (tmp_path / "ppo" / "ppo.png").is_file()
    assert yaml.safe_load((tmp_path / "ppo" / "ppo.yaml").read_text())["ppo"]["minibatch_size"] == 2
    params, _ = load_params(tmp_path / "ppo")  # the PPO policy loads like any checkpoint
    assert params["embedding"].shape == (4096, 64)
    capsys.readouterr()
    assert cli([a.replace("minibatch_size=2", "minibatch_size=4") for a in ppo_args]) == 2
    assert "holds a PPO run with a different recipe (ppo.minibatch_size: 2 → 4)" in capsys.readouterr().err
    assert cli(["ppo", "--policy", str(policy_dir), "--reward-model", str(tmp_path / "rm"), "--run-dir",
                str(tmp_path / "ppo2"), "ppo.itertions=2"]) == 2
    assert "unknown config key 'ppo.itertions'" in capsys.readouterr().err
    assert cli(["ppo", "--policy", str(policy_dir), "--reward-model", str(tmp_path / "rm"), "--run-dir",
                str(tmp_path / "ppo3"), "ppo.batch_size=4", "ppo.minibatch_size=2"]) == 2
    assert "ppo.batch_size=4 rows are not divisible by mesh data×fsdp=8" in capsys.readouterr().err
    assert not (tmp_path / "ppo3").exists()  # a bad setting claims no run directory
    assert cli(["rejection-sample", "--policy", str(policy_dir), "--reward-model", str(policy_dir), "-o",
                str(out)]) == 2
    assert "holds a language model, not a reward model" in capsys.readouterr().err
    assert cli(["rejection-sample", "--policy", str(policy_dir), "--reward-model", str(tmp_path / "rm"),
                "--safety-reward-model", str(policy_dir), "-o", str(out)]) == 2
    assert "holds a language model, not a reward model" in capsys.readouterr().err
    assert cli(["rejection-sample", "--print-config", "--policy", "p"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["policy"] == "p"
