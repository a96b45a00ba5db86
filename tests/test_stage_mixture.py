"""Weighted data sources for SFT / DPO / RM: the realised mixture, its resume and host sharding, the
recipes (CT-LLM zh:en ratios, Llama 2's two reward models) and bad input."""
import hashlib
from pathlib import Path

import numpy as np
import pytest

from jaxllm.config import ConfigError
from jaxllm.stages.mixture import parse_weights
from jaxllm.stages.rows import MixtureIterator, Source
from jaxllm.stages.stages import StageOptions, load_stage_recipe, rm_stage, sft_stage
from jaxllm.train.config import load_config

ASSETS = Path(__file__).resolve().parent.parent / "jaxllm" / "assets"
TOKENIZER = str(ASSETS / "demo" / "tokenizer.model")


def synthetic(name, n, weight, rng, max_examples=6, max_tokens=120):
    examples = rng.integers(1, max_examples + 1, n)
    tokens = rng.integers(20, max_tokens + 1, n)
    rows = {"id": np.asarray([f"{name}{i}" for i in range(n)]), "x": rng.normal(size=(n, 3))}
    return Source(name, rows, weight, examples=examples, tokens=tokens)


@pytest.mark.parametrize("unit", ["tokens", "examples"])
def test_each_source_stays_within_one_row_of_its_share_and_resumes_exactly(unit):
    rng = np.random.default_rng(0)
    sources = [synthetic("a", 37, 8, rng), synthetic("b", 5, 1, rng), synthetic("c", 90, 3, rng)]
    it = MixtureIterator(sources, batch_size=7, unit=unit, seed=3)
    drawn = []
    for _ in range(60):
        batch = next(it)
        drawn += batch["id"].tolist()
        total = sum(it.drawn[unit])
        biggest = max(int(getattr(s, unit).max()) for s in sources)
        for share, target in zip(it.shares(), (8 / 12, 1 / 12, 3 / 12)):
            assert abs(share - target) * total <= biggest / min(it.targets) + 1e-9
    assert it.shares() == pytest.approx([8 / 12, 1 / 12, 3 / 12], abs=0.01)
    # each source is read in epoch-shuffled order: every row once per pass (the small `b` repeats)
    b_rows = [d for d in drawn if d.startswith("b")]
    assert len(b_rows) > 10 and sorted(b_rows[:5]) == [f"b{i}" for i in range(5)]
    # the state restores the exact continuation
    state = it.get_state()
    after = [next(it)["id"].tolist() for _ in range(5)]
    again = MixtureIterator(sources, batch_size=7, unit=unit, seed=3)
    again.set_state(state)
    assert [next(again)["id"].tolist() for _ in range(5)] == after
    assert it.stats()["mix/a"] == pytest.approx(it.shares()[0])
    assert it.stats()["passes/b"] == it.drawn["rows"][1] / 5


def test_hosts_mix_their_own_shards_and_a_changed_source_list_is_refused():
    rng = np.random.default_rng(1)
    sources = [synthetic("a", 40, 1, rng), synthetic("b", 40, 3, rng)]
    hosts = [MixtureIterator(sources, 4, unit="examples", shard_index=h, shard_count=2) for h in range(2)]
    seen = [set(), set()]
    for h, it in enumerate(hosts):
        for _ in range(20):
            seen[h].update(next(it)["id"].tolist())
        assert it.shares() == pytest.approx([0.25, 0.75], abs=0.03)
    assert not seen[0] & seen[1]  # disjoint rows per host
    with pytest.raises(ValueError, match="the checkpoint's data state has 2 sources, this run has 1"):
        MixtureIterator(sources[:1], 4).set_state(hosts[0].get_state())
    with pytest.raises(ValueError, match="source 'a' has no training rows for host 45 of 50"):
        MixtureIterator(sources, 4, shard_index=45, shard_count=50)


def config_for(tmp_path, sources, **stage):
    base = {"run_dir": str(tmp_path / "run"), "model": {"preset": "llama2-tiny", "vocab_size": 4096},
            "data": {"sources": sources, "tokenizer": TOKENIZER, "seq_len": 96},
            "optimizer": {"warmup_steps": 0}, "train": {"steps": 2, "batch_size": 8}}
    return load_config(None, [], base=base), StageOptions(**stage)


def row_sources(iterator):
    """{row hash: source name}: which source each row came from, to count batches independently."""
    return {hashlib.sha1(s.rows["tokens"][r].tobytes() + s.rows["segment_ids"][r].tobytes()).hexdigest(): s.name
            for s in iterator.sources for r in range(len(s))}


@pytest.mark.parametrize("unit", ["examples", "tokens"])
def test_sft_realised_zh_en_ratio_is_within_2_percent_and_logged(tmp_path, unit):
    """zh:en = 4:1 over the shipped zh/en samples: counted from the batches themselves (examples = packed
    segments, tokens = non-padding positions), within 2 % of 80/20; the log names both."""
    sources = [{"name": "zh", "path": str(ASSETS / "stages" / "sft_zh.jsonl"), "weight": 4},
               {"name": "en", "path": str(ASSETS / "stages" / "sft_en.jsonl"), "weight": 1}]
    config, options = config_for(tmp_path, sources, mix_by=unit)
    options.validate()
    lines = []
    stage = sft_stage(config, options, log=lines.append)
    assert lines[-1].startswith(f"sft mixture by {unit}: zh 80.0% (weight 4;") and "en 20.0% (weight 1;" in lines[-1]
    it = stage.make_data(8, 0, 0, 1)
    owner = row_sources(it)
    counts = {"zh": 0, "en": 0}
    for _ in range(40):
        batch = next(it)
        for tokens, segments in zip(batch["tokens"], batch["segment_ids"]):
            name = owner[hashlib.sha1(tokens.tobytes() + segments.tobytes()).hexdigest()]
            counts[name] += int(segments.max()) if unit == "examples" else int((segments > 0).sum())
    share = counts["zh"] / (counts["zh"] + counts["en"])
    print(f"\n  realised zh share by {unit}: {share:.4f} over 320 rows (target 0.8)")
    assert abs(share - 0.8) <= 0.02 * 0.8
    assert it.shares()[0] == pytest.approx(share)
    it.close()
    assert lines[-1].startswith(f"sft mixture by {unit} over 320 rows on this host: zh ") and "(target 80.0%" in lines[-1]


def test_stage_weights_override_and_leave_sources_out(tmp_path):
    sources = [{"name": "zh", "path": str(ASSETS / "stages" / "sft_zh.jsonl")},
               {"name": "en", "path": str(tmp_path / "missing" / "*.jsonl")}]
    config, options = config_for(tmp_path, sources, weights="zh:1,en:0")
    options.validate()
    lines = []
    stage = sft_stage(config, options, log=lines.append)  # en is left out: its (missing) files are not read
    assert not any("mixture" in line for line in lines) and stage.num_rows > 0
    config, options = config_for(tmp_path, sources, weights="fr:1")
    options.validate()
    with pytest.raises(ConfigError, match="stage.weights names source 'fr', but data.sources are named zh, en"):
        sft_stage(config, options)
    for bad, message in (("zh=1", "must look like 'zh:4,en:1'"), ("zh:x", "the weight of 'zh' must be a number"),
                         ("zh:-1", "must be >= 0")):
        with pytest.raises(ConfigError, match=message):
            parse_weights(bad)
    with pytest.raises(ConfigError, match="stage.weights leaves every data source at weight 0"):
        config, options = config_for(tmp_path, sources, weights="zh:0,en:0")
        options.validate()
        sft_stage(config, options)
    with pytest.raises(ConfigError, match="stage.mix_by must be one of tokens, examples, got 'bytes'"):
        StageOptions(mix_by="bytes").validate()


def test_rm_holds_out_each_source_and_mixes_pairs(tmp_path):
    sources = [{"name": "safety", "path": str(ASSETS / "stages" / "rm_sample.jsonl"), "weight": 90},
               {"name": "helpful", "path": str(ASSETS / "stages" / "dpo_sample.jsonl"), "weight": 10}]
    config, options = config_for(tmp_path, sources, mix_by="examples", eval_fraction=0.1)
    lines = []
    stage, held = rm_stage(config, options, log=lines.append)
    assert held["source"].tolist() == [0] * 4 + [1] * 4  # 10 % of each source's 40 pairs
    assert stage.num_rows == 72
    it = stage.make_data(8, 0, 0, 1)
    for _ in range(10):
        batch = next(it)
        assert batch["tokens"].shape == (8, 2, 96) and batch["margin"].shape == (8,)
    assert it.drawn["rows"] == [72, 8]  # 90/10 of 80 pairs, exactly
    with pytest.raises(ConfigError, match="holds out 1 of the 1 preference pairs of source 'one'"):
        one = tmp_path / "one.jsonl"
        one.write_text((ASSETS / "stages" / "rm_sample.jsonl").read_text().splitlines()[0] + "\n")
        config, options = config_for(tmp_path, sources[:1] + [{"name": "one", "path": str(one)}])
        rm_stage(config, options, log=lines.append)


def test_alignment_recipes_load_with_their_mixtures():
    config, options = load_stage_recipe("ctllm-2b-sft")
    assert [(s.name, s.weight) for s in config.data.sources] == [("zh", 1.0), ("en", 1.0)]
    assert options.mix_by == "examples" and options.template == "plain"
    for ratio in ("zh:1,en:1", "zh:2,en:1", "zh:4,en:1", "zh:8,en:1", "zh:1,en:0", "zh:0,en:1"):
        _, options = load_stage_recipe("ctllm-2b-sft", [f"stage.weights={ratio}"])
        assert options.weights == {k: float(v) for k, v in (p.split(":") for p in ratio.split(","))}
    helpful, h_options = load_stage_recipe("llama2-7b-rm-helpful")
    safety, s_options = load_stage_recipe("llama2-7b-rm-safety")
    assert [s.weight for s in helpful.data.sources] == [1.0, 1.0]
    assert [(s.name, s.weight) for s in safety.data.sources] == [("safety", 90.0), ("helpful", 10.0)]
    assert h_options.mix_by == s_options.mix_by == "examples"
    assert helpful.optimizer.lr == safety.optimizer.lr == 1e-5 and helpful.train.epochs == 1  # spec §3.3
    ziya, z_options = load_stage_recipe("ziya-13b-sft")
    assert z_options.template == "ziya" and ziya.data.seq_len == 2048
    mix, _ = load_stage_recipe("sft-mix-demo")
    assert [s.weight for s in mix.data.sources] == [4.0, 1.0]
