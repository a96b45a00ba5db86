"""Packing documents into rows: the stream is preserved, rows never exceed seq_len, masks hold (properties)."""
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxllm.data.packing import ROW_KEYS, Packer, pack

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


@settings(max_examples=80, deadline=None)
@given(docs=documents, seq_len=st.integers(1, 16), cut=st.integers(0, 12))
def test_packer_state_resumes_exactly(docs, seq_len, cut):
    arrays = [np.asarray(d, np.int32) for d in docs]
    expected = list(pack(arrays, seq_len, PAD))
    cut = min(cut, len(arrays))
    first = Packer(seq_len, PAD)
    got = []
    for ids in arrays[:cut]:
        first.add(ids)
        while first.ready():
            got.append(first.pop())
    second = Packer(seq_len, PAD)
    second.set_state(first.get_state())
    got.extend(pack_from(second, arrays[cut:]))
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        for key in ROW_KEYS:
            np.testing.assert_array_equal(a[key], b[key])


def pack_from(packer, arrays):
    for ids in arrays:
        packer.add(ids)
        while packer.ready():
            yield packer.pop()
    if (row := packer.flush()) is not None:
        yield row


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
