"""Data sources in a bucket: globs over gs:// and s3://, jsonl.gz and parquet streamed, resumed at the same
position."""
import gzip
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jaxllm import storage
from jaxllm.data import DataError, DocumentSource, expand_paths


def docs(source, n):
    it = iter(source)
    out = [next(it) for _ in range(n)]
    it.close()
    return out


def jsonl_gz(texts) -> bytes:
    return gzip.compress("".join(json.dumps({"text": t}) + "\n" for t in texts).encode())


@pytest.mark.parametrize("store", ["gcs", "s3"])
def test_bucket_glob_streams_and_resumes(store, request):
    bucket = request.getfixturevalue(store)
    for f in range(3):
        storage.write_atomic(f"{bucket}/corpus/part{f}.jsonl.gz", jsonl_gz([f"f{f} d{d}" for d in range(8)]))
    table = io.BytesIO()
    pq.write_table(pa.table({"text": [f"pq d{d}" for d in range(8)]}), table, row_group_size=3)
    storage.write_atomic(f"{bucket}/corpus/extra.parquet", table.getvalue())
    files = expand_paths([f"{bucket}/corpus/*.jsonl.gz", f"{bucket}/corpus/*.parquet"])
    assert [str(f) for f in files] == [f"{bucket}/corpus/part{f}.jsonl.gz" for f in range(3)] + \
        [f"{bucket}/corpus/extra.parquet"]
    make = lambda: DocumentSource(files, seed=3, shuffle_window=5)
    expected = docs(make(), 50)
    assert sorted(expected[:32]) == sorted([f"f{f} d{d}" for f in range(3) for d in range(8)] +
                                           [f"pq d{d}" for d in range(8)])
    it = iter(make())
    head = [next(it) for _ in range(13)]
    state = json.loads(json.dumps(it.get_state()))
    it.close()
    resumed = iter(make())
    resumed.set_state(state)
    tail = [next(resumed) for _ in range(37)]
    resumed.close()
    assert head + tail == expected


def test_bucket_errors_are_one_line(gcs):
    with pytest.raises(DataError, match=f"'{gcs}/corpus/\\*.jsonl.gz' matches no file"):
        expand_paths(f"{gcs}/corpus/*.jsonl.gz")
    with pytest.raises(storage.StorageError, match="gs://no-such-bucket-jaxllm does not exist"):
        expand_paths("gs://no-such-bucket-jaxllm/corpus/*.jsonl.gz")


def test_data_tokenizer_in_a_bucket(gcs):
    from pathlib import Path

    from jaxllm.data.tokenize import load_tokenizer

    local = Path(__file__).resolve().parent.parent / "jaxllm" / "assets" / "demo" / "tokenizer.model"
    storage.copy(local, f"{gcs}/tok/tokenizer.model")
    assert load_tokenizer(f"{gcs}/tok/tokenizer.model").encode("hello") == load_tokenizer(str(local)).encode("hello")
    with pytest.raises(DataError, match="no tokenizer model at"):
        load_tokenizer(f"{gcs}/tok/missing.model")
