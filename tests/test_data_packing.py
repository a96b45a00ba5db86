"""Packing documents into rows: the stream is preserved, rows never exceed seq_len, masks hold (properties)."""
import json

import grain
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxllm.data.packing import ROW_KEYS, PackedRows, pack

PAD = 0
documents = st.lists(st.lists(st.integers(3, 50), min_size=1, max_size=40), min_size=1, max_size=12)


def _check_rows(docs, rows, seq_len):
    stream = np.concatenate([np.asarray(d) for d in docs])
    owner = np.concatenate([np.full(len(d), i) for i, d in enumerate(docs)])
    learnt = 0
    for r, row in enumerate(rows):
        assert set(row) == set(ROW_KEYS)
        assert all(v.shape == (seq_len,) for v in row.values())
        start = r * seq_len
        seg, pos, mask = row["segment_ids"], row["positions"], row["loss_mask"]
        n_in = int(np.sum(seg > 0))
        assert np.all(seg[n_in:] == 0) and np.all(row["tokens"][n_in:] == PAD) and np.all(mask[n_in:] == 0)
        if r < len(rows) - 1:
            assert n_in == seq_len, "padding only in the last row"
        # inputs and targets are the stream, shifted by one; a row never reaches past seq_len
        np.testing.assert_array_equal(row["tokens"][:n_in], stream[start:start + n_in])
        for i in range(n_in):
            has_target = start + i + 1 < len(stream)
            same_doc = has_target and owner[start + i] == owner[start + i + 1]
            assert mask[i] == float(same_doc)
            if has_target:
                assert row["targets"][i] == stream[start + i + 1]
        learnt += int(mask.sum())
        # segments: 1, 2, … changing exactly where the document changes; positions restart with them
        docs_in_row = owner[start:start + n_in]
        np.testing.assert_array_equal(seg[:n_in], docs_in_row - docs_in_row[0] + 1)
        for i in range(n_in):
            if i == 0 or seg[i] != seg[i - 1]:
                assert pos[i] == 0
            else:
                assert pos[i] == pos[i - 1] + 1
        # attention within a segment never spans two documents
        for s in np.unique(seg[:n_in]):
            assert len(set(docs_in_row[seg[:n_in] == s])) == 1
    # every within-document next-token pair is learnt exactly once
    assert learnt == sum(len(d) - 1 for d in docs)
    assert len(rows) == -(-(len(stream) - 1) // seq_len)  # every target once, no empty rows


@settings(max_examples=150, deadline=None)
@given(docs=documents, seq_len=st.integers(1, 24))
def test_packing_preserves_stream_and_masks(docs, seq_len):
    rows = list(pack([np.asarray(d) for d in docs], seq_len, PAD))
    if sum(map(len, docs)) < 2:
        assert rows == []
        return
    _check_rows(docs, rows, seq_len)


def packed_rows(arrays, seq_len):
    """A PackedRows iterator over in-memory documents (state: the parent's index)."""
    return iter(PackedRows(grain.MapDataset.source(arrays).to_iter_dataset(), seq_len, PAD))


@settings(max_examples=80, deadline=None)
@given(docs=st.lists(st.lists(st.integers(3, 50), min_size=0, max_size=40), min_size=1, max_size=12),
       seq_len=st.integers(1, 16), cut=st.integers(0, 30))
def test_packed_rows_resume_exactly_from_a_position(docs, seq_len, cut):
    """The state is a position (where to re-read from, how many tokens were emitted), not the buffered
    tokens, and restoring it gives the same rows; empty documents included."""
    arrays = [np.asarray(d, np.int32) for d in docs]
    expected = list(pack(arrays, seq_len, PAD))
    first = packed_rows(arrays, seq_len)
    got = [row for _, row in zip(range(cut), first)]
    state = json.loads(json.dumps(first.get_state()))
    assert set(state) == {"parent", "reread", "emitted", "exhausted"}
    second = packed_rows(arrays, seq_len)
    second.set_state(state)
    got.extend(second)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        for key in ROW_KEYS:
            np.testing.assert_array_equal(a[key], b[key])


def test_a_long_document_costs_a_position_not_its_tokens():
    """A 3M-token document buffered by the packer: the state stays a few bytes, and a resumed iterator
    continues with the same rows (the document is re-read, not stored)."""
    rng = np.random.default_rng(0)
    arrays = [rng.integers(3, 4000, 3_000_000, dtype=np.int32), np.arange(3, 40, dtype=np.int32)]
    first = packed_rows(arrays, 4096)
    for _ in range(5):
        next(first)
    state = first.get_state()
    assert state == {"parent": {"next_index": 0}, "reread": 1, "emitted": 5 * 4096, "exhausted": False}
    assert len(json.dumps(state)) < 200
    second = packed_rows(arrays, 4096)
    second.set_state(state)
    for _ in range(3):
        a, b = next(first), next(second)
        for key in ROW_KEYS:
            np.testing.assert_array_equal(a[key], b[key])


def test_a_state_written_before_positions_still_resumes():
    """Checkpoints of earlier versions hold the packer's buffered tokens: they resume, and the state goes back
    to a position once those tokens are emitted."""
    arrays = [np.arange(3, 3 + n, dtype=np.int32) for n in (5, 9, 4, 7, 6, 8)]
    expected = list(pack(arrays, 4, PAD))
    legacy = {"parent": {"next_index": 2}, "exhausted": False,
              "packer": {"tokens": arrays[1][4 * 3 - 5:].tolist(), "docs": [0] * (9 - 7)}}
    resumed = packed_rows(arrays, 4)
    resumed.set_state(legacy)
    assert "packer" in resumed.get_state()
    rows = list(resumed)
    assert "packer" not in resumed.get_state()
    assert len(rows) == len(expected) - 3
    for a, b in zip(rows, expected[3:]):
        for key in ROW_KEYS:
            np.testing.assert_array_equal(a[key], b[key])


def test_eos_is_the_target_of_the_last_token_and_next_document_is_not():
    eos = 2
    rows = list(pack([np.array([10, 11, eos]), np.array([20, 21, 22, eos])], seq_len=4))
    first = rows[0]
    np.testing.assert_array_equal(first["tokens"], [10, 11, eos, 20])
    np.testing.assert_array_equal(first["targets"], [11, eos, 20, 21])
    np.testing.assert_array_equal(first["loss_mask"], [1, 1, 0, 1])  # 11→EOS learnt; EOS→20 crosses
    np.testing.assert_array_equal(first["segment_ids"], [1, 1, 1, 2])
    np.testing.assert_array_equal(first["positions"], [0, 1, 2, 0])
    second = rows[1]  # the continued document restarts its positions and is padded at the end
    np.testing.assert_array_equal(second["tokens"], [20, 21, 22, eos][1:] + [0])
    np.testing.assert_array_equal(second["segment_ids"], [1, 1, 1, 0])
    np.testing.assert_array_equal(second["loss_mask"], [1, 1, 0, 0])
