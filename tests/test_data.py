"""Data sources and the pretraining pipeline: formats, malformed records, shuffling, host shards, mixtures,
and exact resumption from the iterator state."""
import gzip
import itertools
import json

import numpy as np
import pytest

from jaxllm.config import ConfigError
from jaxllm.data import (DataConfig, DataError, DocumentSource, expand_paths, load_tokenizer,
                         pretraining_batches)
from jaxllm.data.files import read_records

TOKENIZER = "assets:demo/tokenizer.model"


def docs_of(source, n=None):
    it = iter(source)
    out = list(itertools.islice(it, n)) if n else list(it)
    it.close()
    return out


def write_jsonl(path, texts, field="text"):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({field: text}) + "\n")
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TOKENIZER)


@pytest.fixture
def corpus(tmp_path):
    """Three jsonl files with 10 documents each, 'f<file> d<doc>'."""
    paths = []
    for f in range(3):
        paths.append(write_jsonl(tmp_path / f"part{f}.jsonl", [f"f{f} d{d} " + "word " * d for d in range(10)]))
    return paths


def test_every_format_reads_the_same_documents(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = ["first doc\nwith two lines", "second doc", "third doc 三"]
    write_jsonl(tmp_path / "a.jsonl", texts)
    write_jsonl(tmp_path / "a.jsonl.gz", texts)
    write_jsonl(tmp_path / "c.jsonl", texts, field="content")
    pq.write_table(pa.table({"text": texts, "id": [1, 2, 3]}), tmp_path / "a.parquet", row_group_size=2)
    (tmp_path / "a.txt").write_text("\n\n".join(texts) + "\n")
    (tmp_path / "lines.txt").write_text("one\n\ntwo\nthree\n")
    read = lambda path, **kw: docs_of(DocumentSource(expand_paths(str(tmp_path / path)), shuffle=False,
                                                     num_epochs=1, **kw))
    assert read("a.jsonl") == texts
    assert read("a.jsonl.gz") == texts
    assert read("a.parquet") == texts
    assert read("c.jsonl", text_field="content") == texts
    assert read("a.txt") == texts  # blank-line separated paragraphs
    assert read("lines.txt", text_split="line") == ["one", "two", "three"]
    assert read("lines.txt", text_split="file") == ["one\n\ntwo\nthree\n"]
    assert len(expand_paths(str(tmp_path / "a.*"))) == 4  # a glob
    with pytest.raises(DataError, match=r"matches no file"):
        expand_paths(str(tmp_path / "missing*.jsonl"))
    with pytest.raises(DataError, match="no column 'body'"):
        docs_of(DocumentSource([tmp_path / "a.parquet"], text_field="body", num_epochs=1))


@pytest.fixture
def malformed(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "good one"}\n'
                     b'{"text": "broken\n'                 # line 2: bad JSON
                     b'{"title": "no text"}\n'             # line 3: missing field
                     b'{"text": "   "}\n'                  # line 4: empty text
                     b'{"text": "\xff\xfe bytes"}\n'       # line 5: not UTF-8
                     b'{"text": 7}\n'                      # line 6: not a string
                     b'[1, 2]\n'                           # line 7: not an object
                     b'\n'
                     b'{"text": "good two"}\n')
    return path


def test_malformed_records_are_skipped_and_counted(malformed):
    source = DocumentSource([malformed], num_epochs=1, shuffle=False)
    assert docs_of(source) == ["good one", "good two"]
    assert source.stats.skipped == {"bad JSON": 1, "missing field": 1, "empty text": 1, "non-UTF-8": 1,
                                    "not a string": 1, "not an object": 1}


def test_malformed_records_stop_the_run_with_file_and_line(malformed):
    with pytest.raises(DataError, match=rf"{malformed}:2: bad JSON"):
        docs_of(DocumentSource([malformed], num_epochs=1, shuffle=False, on_error="raise"))


def test_a_source_without_usable_documents_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text('{"text": ""}\n{"nope": 1}\n')
    with pytest.raises(DataError, match="no usable documents.*empty text: 1, missing field: 1"):
        docs_of(DocumentSource([path]), 1)


def test_shuffling_is_deterministic_by_seed_and_covers_each_epoch(corpus):
    make = lambda seed: DocumentSource(corpus, seed=seed, shuffle_window=7, num_epochs=2)
    a, b, c = docs_of(make(0)), docs_of(make(0)), docs_of(make(1))
    assert a == b and a != c
    everything = sorted(docs_of(DocumentSource(corpus, shuffle=False, num_epochs=1)))
    assert sorted(a[:30]) == everything and sorted(a[30:]) == everything  # each epoch: all, once
    assert a[:30] != a[30:]  # a new order every epoch


@pytest.mark.parametrize("hosts", [2, 3, 4])
def test_hosts_read_disjoint_shards_that_cover_the_data(corpus, hosts, monkeypatch):
    """3 files: 2 or 3 hosts split them by file (each host opens only its own), 4 hosts split records."""
    import jaxllm.data.sources as sources
    opened = []
    monkeypatch.setattr(sources, "read_records",
                        lambda path, *a, **k: opened.append(path) or read_records(path, *a, **k))
    shards = []
    for i in range(hosts):
        opened.clear()
        shards.append(docs_of(DocumentSource(corpus, seed=3, shard_index=i, shard_count=hosts, num_epochs=1)))
        files_read = {path.name for path in opened}
        assert len(files_read) == (len(range(i, 3, hosts)) if hosts <= 3 else 3), files_read
        assert {doc.split()[0] for doc in shards[-1]} == {f"f{name[4]}" for name in files_read}
    assert sum(map(len, shards)) == 30
    assert sorted(itertools.chain(*shards)) == sorted(docs_of(DocumentSource(corpus, num_epochs=1)))


@pytest.mark.parametrize("cut", [0, 4, 7, 29, 30, 45])
def test_document_iterator_resumes_exactly_from_its_state(corpus, cut):
    make = lambda: DocumentSource(corpus, seed=5, shuffle_window=7, shard_index=1, shard_count=2)
    expected = docs_of(make(), 60)
    it = iter(make())
    head = [next(it) for _ in range(cut)]
    state = json.loads(json.dumps(it.get_state()))  # the state survives JSON, as in a checkpoint
    it.close()
    resumed = iter(make())
    resumed.set_state(state)
    tail = [next(resumed) for _ in range(60 - cut)]
    resumed.close()
    assert head + tail == expected


def data_config(paths, **kw):
    sources = [{"path": str(p), "name": f"s{i}", "weight": w} for i, (p, w) in enumerate(paths)]
    return DataConfig(sources=sources, tokenizer=TOKENIZER, seq_len=kw.pop("seq_len", 16), add_bos=False,
                      **kw)


def test_pipeline_batches_have_the_documented_layout(corpus, tokenizer):
    it = pretraining_batches(data_config([(corpus[0], 1)]), tokenizer, batch_size=4, seed=0,
                             shard_index=0, shard_count=1)
    batch = next(it)
    it.close()
    assert sorted(batch) == ["loss_mask", "positions", "segment_ids", "targets", "tokens"]
    assert all(v.shape == (4, 16) for v in batch.values())
    assert batch["tokens"].dtype == np.int32 and batch["loss_mask"].dtype == np.float32
    # every document ends with EOS, which is learnt as the target of its last token
    eos_targets = batch["targets"] == tokenizer.eos_id
    assert eos_targets.any() and np.all(batch["loss_mask"][eos_targets] == 1)
    assert np.all(batch["segment_ids"] >= 1)
    assert not it.finite  # repeats forever: hosts need not agree each step on running out


def test_a_finite_pipeline_runs_out_and_says_so(corpus, tokenizer):
    it = pretraining_batches(data_config([(corpus[0], 1)], num_epochs=1), tokenizer, batch_size=2, seed=0,
                             shard_index=0, shard_count=1)
    assert it.finite
    batches = list(it)
    it.close()
    assert 0 < len(batches) < 10


def test_mixture_weights_are_token_shares(tmp_path, tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", ["alpha " * 3] * 50)        # short documents
    b = write_jsonl(tmp_path / "b.jsonl", ["beta " * 40] * 50)        # long documents
    it = pretraining_batches(data_config([(a, 1), (b, 3)]), tokenizer, batch_size=8, seed=0,
                             shard_index=0, shard_count=1)
    rows = np.concatenate([next(it)["tokens"] for _ in range(20)])
    it.close()
    alpha = tokenizer.encode("alpha")[0]
    from_a = np.mean([alpha in row for row in rows])
    assert abs(from_a - 0.25) < 0.05  # a quarter of the rows (= tokens), despite shorter documents


def test_pipeline_resumes_with_the_same_batches(corpus, tmp_path, tokenizer):
    gz = write_jsonl(tmp_path / "more.jsonl.gz", [f"more {i} " * (i % 7 + 1) for i in range(40)])
    config = data_config([(corpus[0], 2), (gz, 1)], shuffle_window=5, prefetch=2)
    make = lambda: pretraining_batches(config, tokenizer, batch_size=3, seed=1, shard_index=0, shard_count=1)
    full = make()
    expected = [next(full) for _ in range(12)]
    full.close()
    first = make()
    for _ in range(5):
        next(first)
    state = json.loads(json.dumps(first.get_state()))
    first.close()
    second = make()
    second.set_state(state)
    resumed = [next(second) for _ in range(7)]
    second.close()
    for got, want in zip(resumed, expected[5:]):
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_data_config_errors_name_the_field(corpus):
    with pytest.raises(ConfigError, match=r"unknown config key 'data.sources.0.wieght' \(did you mean 'weight'"):
        DataConfig(sources=[{"path": "x", "wieght": 2}])
    with pytest.raises(ConfigError, match=r"data.sources.0.weight must be > 0"):
        DataConfig(sources=[{"path": "x", "weight": 0}]).validate()
    with pytest.raises(ConfigError, match=r"data.on_error must be one of .* \(did you mean 'raise'"):
        DataConfig(sources=["x"], on_error="rase").validate()


# ----------------------------------------------------------------------------------------- damaged files

@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    """A .jsonl.gz cut in half, a parquet file cut in half, and a parquet file whose second row group is
    garbage; each beside an intact twin."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("damaged")
    texts = [f"document {i} " + "word " * (i % 13) for i in range(3000)]
    gz = write_jsonl(root / "cut.jsonl.gz", texts)
    gz.write_bytes(gz.read_bytes()[: gz.stat().st_size // 2])
    table = pa.table({"text": texts[:400]})
    cut = root / "cut.parquet"
    pq.write_table(table, cut, row_group_size=100, compression="none")
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    group = root / "group.parquet"
    pq.write_table(table, group, row_group_size=100, compression="none", use_dictionary=False)
    handle = pq.ParquetFile(group)
    chunk = handle.metadata.row_group(1).column(0)
    data = bytearray(group.read_bytes())
    start = chunk.data_page_offset
    data[start:start + chunk.total_compressed_size] = b"\xff" * chunk.total_compressed_size
    group.write_bytes(bytes(data))
    return {"gz": gz, "cut": cut, "group": group, "texts": texts}


@pytest.mark.parametrize("name,message", [
    ("gz", r"cut.jsonl.gz: file ends early \(truncated\) after line \d+: Compressed file ended"),
    ("cut", r"cut.parquet: not a readable parquet file \(truncated or damaged\?\)"),
    ("group", r"group.parquet: rows 101-200 \(row group 1\) cannot be read"),
])
def test_a_damaged_file_is_one_line_naming_it_or_skipped_and_counted(damaged, name, message, capfd):
    path = damaged[name]
    with pytest.raises(DataError, match=message) as raised:
        docs_of(DocumentSource([path], shuffle=False, num_epochs=1, on_error="raise"))
    assert "\n" not in str(raised.value) and str(raised.value).endswith("(data.on_error=raise)")
    if name == "cut":  # nothing is readable: the source has no documents, which is its own one-line error
        with pytest.raises(DataError, match="no usable documents .* damaged file: 1"):
            docs_of(DocumentSource([path], shuffle=False, num_epochs=1))
        return
    source = DocumentSource([path], shuffle=False, num_epochs=1)
    docs = docs_of(source)
    texts = damaged["texts"]
    if name == "gz":  # every line before the damage, then the rest of the file is skipped
        assert 0 < len(docs) < len(texts) and docs == texts[:len(docs)]
    else:  # the unreadable row group is skipped, the groups after it are read
        assert docs == texts[:100] + texts[200:400]
    assert source.stats.skipped == {"damaged file": 1}
    warning = [line for line in capfd.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and str(path) in warning[0] and "data.on_error=skip" in warning[0]


def test_a_pipeline_that_fails_to_start_is_an_error_and_nothing_else(damaged, tokenizer, monkeypatch):
    """The first block of a damaged file fails inside the iterator's construction: one DataError, and the
    half-built iterator is collected without a second traceback."""
    import gc
    import sys

    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    config = DataConfig(sources=[str(damaged["gz"])], tokenizer=TOKENIZER, seq_len=16, on_error="raise")
    with pytest.raises(DataError, match="file ends early"):
        pretraining_batches(config, tokenizer, batch_size=2, shard_index=0, shard_count=1)
    gc.collect()
    assert unraisable == []


def test_a_byte_order_mark_is_not_part_of_the_first_record(tmp_path):
    bom = b"\xef\xbb\xbf"
    (tmp_path / "a.jsonl").write_bytes(bom + b'{"text": "first"}\n{"text": "second"}\n')
    (tmp_path / "a.txt").write_bytes(bom + b"first\n\nsecond\n")
    for name in ("a.jsonl", "a.txt"):
        source = DocumentSource([tmp_path / name], shuffle=False, num_epochs=1, on_error="raise")
        assert docs_of(source) == ["first", "second"]


def test_sft_dpo_and_rm_data_use_the_same_reader(tmp_path, damaged):
    """The stages read .jsonl.gz, accept a byte-order mark, and treat a damaged file per data.on_error."""
    from jaxllm.stages.data import DataFormatError, Stats, read_jsonl

    pairs = [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(3)]
    gz = tmp_path / "pairs.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write("\ufeff" + "".join(json.dumps(p) + "\n" for p in pairs))
    stats = Stats()
    assert [record for _, record in read_jsonl(gz, stats, on_error="raise")] == pairs
    with pytest.raises(DataFormatError, match=r"cut.jsonl.gz: file ends early .*data.on_error=raise"):
        list(read_jsonl(damaged["gz"], Stats(), on_error="raise"))
    stats = Stats()
    records = list(read_jsonl(damaged["gz"], stats))
    assert 0 < len(records) < 3000 and stats.reasons == {"damaged file": 1}
