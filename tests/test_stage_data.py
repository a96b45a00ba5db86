"""SFT / preference data: formats, validation, packing (packed loss == one-by-one loss), masking."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxllm.models import forward, get_preset, init_params
from jaxllm.stages.data import (DataFormatError, check_conversation,
                                encode_preferences, encode_sft, pack_examples, to_messages)
from jaxllm.stages.losses import LLAMA2_MARGINS, token_logprobs


class CharTokenizer:
    """Bytes as ids (offset 3), bos 1, eos 2: enough to test data plumbing without sentencepiece."""
    bos_id, eos_id, pad_id = 1, 2, 0

    def encode(self, text, bos=False, eos=False):
        return [self.bos_id] * bos + [b % 200 + 3 for b in text.encode()] + [self.eos_id] * eos


class TurnTemplate:
    """BOS + user bytes + assistant bytes + EOS per turn; the mask covers assistant bytes and EOS."""

    def render(self, tok, messages):
        ids, mask = [], []
        for m in messages:
            if m["role"] == "assistant":
                piece = tok.encode(m["content"], eos=True)
                ids += piece
                mask += [1] * len(piece)
            else:
                piece = tok.encode(m["content"], bos=m["role"] == "user")
                ids += piece
                mask += [0] * len(piece)
        return ids, mask


def write_jsonl(path, rows):
    with open(path, "wb") as f:
        for row in rows:
            f.write(row if isinstance(row, bytes) else (json.dumps(row, ensure_ascii=False) + "\n").encode())
    return path


def test_three_formats_give_the_same_messages():
    alpaca = {"instruction": "Translate", "input": "你好", "output": "Hello"}
    sharegpt = {"conversations": [{"from": "human", "value": "Translate\n你好"}, {"from": "gpt", "value": "Hello"}]}
    openai = {"messages": [{"role": "user", "content": "Translate\n你好"}, {"role": "assistant", "content": "Hello"}]}
    assert to_messages(alpaca) == to_messages(sharegpt) == to_messages(openai)


@pytest.mark.parametrize("record,message", [
    ({"text": "x"}, "unknown SFT format"),
    ({"instruction": "x"}, "missing field 'output'"),
    ({"conversations": [{"from": "alien", "value": "x"}]}, "conversations\\[0\\].from must be one of"),
    ({"messages": [{"role": "user"}]}, "messages\\[0\\] needs 'role' and 'content'"),
])
def test_bad_records_name_the_problem(record, message):
    with pytest.raises(DataFormatError, match=message):
        to_messages(record)


@pytest.mark.parametrize("messages,message", [
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "turns must alternate"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}], "is empty"),
    ([{"role": "user", "content": "a"}], "must end with an assistant reply"),
])
def test_conversation_checks(messages, message):
    with pytest.raises(DataFormatError, match=message):
        check_conversation(messages)


def test_bad_lines_are_skipped_and_counted_or_raise_with_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [
        {"instruction": "hi", "output": "there"},
        b"{not json\n",
        b"\xff\xfe bad utf8\n",
        {"instruction": "hi"},
        {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
        {"instruction": "q", "output": "  "},
    ])
    examples, stats = encode_sft([path], CharTokenizer(), TurnTemplate(), seq_len=64)
    assert len(examples) == 1 and stats.examples == 1 and stats.skipped == 5
    assert stats.reasons["bad JSON"] == 1 and stats.reasons["non-UTF-8"] == 1
    with pytest.raises(DataFormatError, match=f"{path}:2: bad JSON"):
        encode_sft([path], CharTokenizer(), TurnTemplate(), seq_len=64, on_error="raise")
    second = write_jsonl(tmp_path / "b.jsonl", [{"instruction": "hi", "output": "x"}] * 3 + [{"instruction": "hi"}])
    with pytest.raises(DataFormatError, match=f"{second}:4: Alpaca-style record is missing field 'output'"):
        encode_sft([second], CharTokenizer(), TurnTemplate(), seq_len=64, on_error="raise")


def test_truncation_policy_is_counted(tmp_path):
    path = write_jsonl(tmp_path / "long.jsonl", [{"instruction": "q" * 5, "output": "a" * 50},
                                                 {"instruction": "q" * 40, "output": "a" * 5}])
    kept, stats = encode_sft([path], CharTokenizer(), TurnTemplate(), seq_len=20, truncation="truncate")
    assert stats.truncated == 2 and stats.dropped_too_long == 1 and len(kept) == 1  # 2nd lost its reply
    assert all(len(ids) == 21 for ids, _ in kept)
    dropped, stats = encode_sft([path], CharTokenizer(), TurnTemplate(), seq_len=20, truncation="drop")
    assert not dropped and stats.dropped_too_long == 2


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(2, 30), min_size=1, max_size=12), st.integers(30, 64))
def test_packing_never_crosses_rows_and_keeps_every_example(lengths, seq_len):
    rng = np.random.default_rng(len(lengths))
    examples = [(rng.integers(3, 100, n).astype(np.int32), rng.integers(0, 2, n).astype(np.float32))
                for n in lengths]
    rows = pack_examples(examples, seq_len)
    assert rows["tokens"].shape[1] == seq_len
    recovered = []
    for r in range(len(rows["tokens"])):
        for seg in range(1, rows["segment_ids"][r].max() + 1):
            span = rows["segment_ids"][r] == seg
            np.testing.assert_array_equal(rows["positions"][r][span], np.arange(span.sum()))
            recovered.append((rows["tokens"][r][span], rows["targets"][r][span], rows["loss_mask"][r][span]))
        assert not rows["loss_mask"][r][rows["segment_ids"][r] == 0].any()
    assert len(recovered) == len(examples)
    for (ids, mask), (tokens, targets, loss_mask) in zip(examples, recovered):
        np.testing.assert_array_equal(tokens, ids[:-1])
        np.testing.assert_array_equal(targets, ids[1:])
        np.testing.assert_array_equal(loss_mask, mask[1:])


def test_packed_batch_loss_equals_examples_one_by_one(tmp_path):
    cfg = get_preset("llama2-tiny")
    params = init_params(cfg, jax.random.key(0))
    path = write_jsonl(tmp_path / "sft.jsonl", [
        {"instruction": "ab", "output": "cde"},
        {"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "yz"},
                           {"from": "human", "value": "w"}, {"from": "gpt", "value": "vuts"}]},
        {"instruction": "long question", "output": "ok"}])
    examples, _ = encode_sft([path], CharTokenizer(), TurnTemplate(), seq_len=48)
    rows = pack_examples(examples, seq_len=48)
    assert len(rows["tokens"]) == 1  # all three share one row

    def loss_sum(batch):
        logits = forward(cfg, params, jnp.asarray(batch["tokens"]), jnp.asarray(batch["positions"]),
                         jnp.asarray(batch["segment_ids"]))
        nll = -token_logprobs(logits, jnp.asarray(batch["targets"])) * batch["loss_mask"]
        return float(nll.sum()), float(batch["loss_mask"].sum())

    packed_sum, packed_count = loss_sum(rows)
    alone = [loss_sum(pack_examples([ex], seq_len=len(ex[0]) - 1)) for ex in examples]
    np.testing.assert_allclose(packed_sum / packed_count,
                               sum(s for s, _ in alone) / sum(c for _, c in alone), rtol=1e-5)


def test_preference_pairs_with_conversation_prompts_and_ratings(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "2+2?", "chosen": "4", "rejected": "5", "rating": "significantly better"},
        {"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                    {"role": "user", "content": "name?"}], "chosen": "jax", "rejected": "torch"},
        {"prompt": "x", "chosen": "y"},
        {"prompt": "x", "chosen": "y", "rejected": "z", "rating": "meh"},
    ])
    batch, stats = encode_preferences([path], CharTokenizer(), TurnTemplate(), seq_len=64,
                                      margins=LLAMA2_MARGINS["large"])
    assert stats.examples == 2 and stats.skipped == 2
    assert batch["tokens"].shape == (2, 2, 64)
    np.testing.assert_allclose(batch["margin"], [3.0, 0.0])
    # chosen and rejected share the prompt; the mask covers only the reply (+ EOS)
    for i in range(2):
        for j in range(2):
            k = batch["last"][i, j] + 1
            assert batch["loss_mask"][i, j, :k].sum() == np.count_nonzero(batch["loss_mask"][i, j])
    assert batch["loss_mask"][0, 0].sum() == 2  # "4" + EOS
    with pytest.raises(DataFormatError, match=f"{path}:3: missing field 'rejected'"):
        encode_preferences([path], CharTokenizer(), TurnTemplate(), seq_len=64, on_error="raise")
