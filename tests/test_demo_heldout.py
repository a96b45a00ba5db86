"""The demo's held-out slice (`data.sources.N.holdout`: a source's last N documents) is never trained on,
and `train.final_eval` ends `jaxllm train` with its perplexity and greedy samples (printed and logged)."""
import gzip
import json

import pytest

from jaxllm import cli
from jaxllm.config import ConfigError
from jaxllm.data import DocumentSource, load_tokenizer, pretraining_batches
from jaxllm.data.files import resolve_path
from jaxllm.data.pipeline import heldout_texts
from jaxllm.data.sources import heldout_documents
from jaxllm.train.config import CONFIGS_DIR, load_config


def _texts(path):
    return [json.loads(line)["text"] for line in gzip.open(path, "rt", encoding="utf-8")]


def _epoch(source):
    it = iter(source)
    out = []
    while True:
        try:
            out.append(next(it))
        except StopIteration:
            return out


def test_the_demo_recipe_holds_out_the_last_documents_of_each_source_and_never_trains_on_them():
    config = load_config(CONFIGS_DIR / "demo.yaml")
    held = heldout_texts(config.data)
    assert set(held) == {"zh", "en"}
    for spec in config.data.sources:
        docs = _texts(resolve_path(spec.path))
        assert spec.holdout > 0 and held[spec.name] == docs[-spec.holdout:]
        # one epoch of the training source: every other document once, none of the held-out ones
        source = DocumentSource([resolve_path(spec.path)], name=spec.name, shuffle_window=500, num_epochs=1,
                                holdout=spec.holdout)
        assert sorted(_epoch(source)) == sorted(docs[:-spec.holdout])
    # and the recipe's pipeline is built with it: the zh rows of a whole epoch hold no held-out poem
    zh = config.data.sources[0]
    config.data.sources = [zh]
    config.data.num_epochs, config.data.prefetch = 1, 0
    tok = load_tokenizer(config.data.tokenizer)
    rows = []  # in order: packed rows continue each other, so their text is the stream of poems
    for batch in pretraining_batches(config.data, tok, batch_size=8, shard_index=0, shard_count=1):
        rows += [[int(t) for t in row] for row in batch["tokens"]]
    text = tok.decode([t for row in rows for t in row if t not in (tok.eos_id, tok.pad_id)])
    last_lines = [poem.splitlines()[-1] for poem in _texts(resolve_path(zh.path))]
    assert sum(line in text for line in last_lines[:-zh.holdout]) > 0.9 * (len(last_lines) - zh.holdout)
    assert not any(line in text for line in last_lines[-zh.holdout:])


def test_holdout_spans_files_from_the_end_and_resumes(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("a0\n\na1\n\na2\n")
    b.write_text("b0\n\nb1\n\nb2\n")
    assert [d.strip() for d in heldout_documents([a, b], 4)] == ["a2", "b0", "b1", "b2"]
    make = lambda: DocumentSource([a, b], shuffle=False, shuffle_window=1, num_epochs=2, holdout=4)
    it = iter(make())
    first = next(it)
    state = it.get_state()
    rest = _epoch(it)
    assert [d.strip() for d in [first, *rest]] == ["a0", "a1", "a0", "a1"]  # two epochs of what is left
    again = iter(make())
    again.set_state(state)
    assert _epoch(again) == rest
    with pytest.raises(ConfigError, match="holdout"):
        load_config(CONFIGS_DIR / "demo.yaml", ["data.sources.0.holdout=-1"])
    with pytest.raises(ConfigError, match="unknown config key 'train.final_eval.prompt'"):
        load_config(CONFIGS_DIR / "demo.yaml", ["train.final_eval.prompt=[x]"])


def test_the_demo_ends_with_its_heldout_perplexity_and_greedy_samples(tmp_path, capsys):
    run = tmp_path / "demo"
    assert cli.main(["train", f"run_dir={run}", "train.steps=2", "optimizer.warmup_steps=1", "train.batch_size=8", "data.seq_len=32",
                     "data.shuffle_window=64", "train.final_eval.max_new_tokens=4", "log.progress=false",
                     "log.tensorboard=false", "log.plot=false"]) == 0
    out = capsys.readouterr().out
    assert "held-out perplexity " in out and "zh " in out and "en " in out
    samples = [line for line in out.splitlines() if line.startswith("greedy sample (repetition penalty 1.3): ")]
    assert [s.split(": ", 1)[1][:5] for s in samples] == ["床前明月光", "In th"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    assert last["final_eval"] and last["step"] == 2 and last["heldout/perplexity"] > 1
    assert [s["prompt"] for s in last["samples"]] == ["床前明月光", "In the beginning God"]
    assert all("loss" in r for r in records[:-1])
    # the README's command gives the run's sample: greedy with the same penalty
    assert cli.main(["generate", "--checkpoint", str(run), "--prompt", "In the beginning God", "--temperature", "0",
                     "--repetition-penalty", "1.3", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip() == "In the beginning God" + last["samples"][1]["completion"]
    with pytest.raises(ConfigError, match="repetition_penalty must be a number >= 1"):
        load_config(CONFIGS_DIR / "demo.yaml", ["train.final_eval.repetition_penalty=0.5"])
