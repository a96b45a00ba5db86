"""SFT / preference data: formats, validation, packing (packed loss == one-by-one loss), masking."""
import json
from pathlib import Path

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

    def prompt(self, tok, messages):
        return self.render(tok, messages)[0]

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


def test_truncation_policy_is_counted_once_per_example(tmp_path):
    path = write_jsonl(tmp_path / "long.jsonl", [{"instruction": "q" * 5, "output": "a" * 50},
                                                 {"instruction": "q" * 40, "output": "a" * 5},
                                                 {"instruction": "q", "output": "a"}])
    kept, stats = encode_sft([path], CharTokenizer(), TurnTemplate(), seq_len=20, truncation="truncate")
    # the 1st is cut and kept, the 2nd cut to its prompt and so dropped (only that counts), the 3rd fits
    assert (stats.examples, stats.truncated, stats.dropped_too_long) == (2, 1, 1) and len(kept) == 2
    assert [len(ids) for ids, *_ in kept] == [21, 4]  # BOS q a EOS
    dropped, stats = encode_sft([path], CharTokenizer(), TurnTemplate(), seq_len=20, truncation="drop")
    assert len(dropped) == 1 and (stats.truncated, stats.dropped_too_long) == (0, 2)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "q" * 40, "chosen": "a", "rejected": "b"},
                                                   {"prompt": "q", "chosen": "a" * 40, "rejected": "b"}])
    batch, stats = encode_preferences([pairs], CharTokenizer(), TurnTemplate(), seq_len=20)
    assert (stats.examples, stats.truncated, stats.dropped_too_long) == (1, 1, 1)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(2, 30), min_size=1, max_size=12), st.integers(30, 64))
def test_packing_never_crosses_rows_and_keeps_every_example(lengths, seq_len):
    rng = np.random.default_rng(len(lengths))
    examples = [(rng.integers(3, 100, n).astype(np.int32), rng.integers(0, 2, n).astype(np.float32),
                 rng.integers(100, 200, n).astype(np.int32)) for n in lengths]  # labels ≠ ids: targets use labels
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
    for (ids, mask, labels), (tokens, targets, loss_mask) in zip(examples, recovered):
        np.testing.assert_array_equal(tokens, ids[:-1])
        np.testing.assert_array_equal(targets, labels[1:])
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
    # each row holds the whole sequence, its final EOS included at `last` (where a reward model reads it);
    # targets/loss_mask are its next-token view
    chosen = CharTokenizer().encode("2+2?", bos=True) + CharTokenizer().encode("4", eos=True)
    assert batch["last"][0, 0] == len(chosen) - 1
    np.testing.assert_array_equal(batch["tokens"][0, 0, :len(chosen)], chosen)
    np.testing.assert_array_equal(batch["targets"][0, 0, :len(chosen) - 1], chosen[1:])
    np.testing.assert_array_equal(batch["segment_ids"][0, 0], [1] * len(chosen) + [0] * (64 - len(chosen)))
    for i in range(2):
        for j in range(2):
            assert batch["tokens"][i, j, batch["last"][i, j]] == CharTokenizer.eos_id
            assert not batch["loss_mask"][i, j, batch["last"][i, j]:].any()
    assert batch["loss_mask"][0, 0].sum() == 2  # "4" + EOS
    # a conversation prompt's earlier reply ("hello") is context: only "jax"/"torch" + EOS are learned
    assert batch["loss_mask"][1].sum(axis=1).tolist() == [4, 6]
    with pytest.raises(DataFormatError, match=f"{path}:3: missing field 'rejected'"):
        encode_preferences([path], CharTokenizer(), TurnTemplate(), seq_len=64, on_error="raise")


BAICHUAN = Path(__file__).parent / "data" / "baichuan-64k.model"


def official_baichuan2_sft(turns, eos=2):
    """Baichuan 2's fine-tune.py preprocessing (spec §6.6): input Σ ([195]+user, [196]+reply) + [EOS];
    labels: user turn [EOS] + [-100]·len(user), reply turn [-100] + reply, final EOS; then the model's
    shift: position t is trained on labels[t + 1]."""
    ids, labels = [], []
    for user, reply in turns:
        ids += [195] + user + [196] + reply
        labels += [eos] + [-100] * len(user) + [-100] + reply
    ids.append(eos)
    labels.append(eos)
    return ids[:-1], labels[1:]


def test_baichuan2_multi_turn_sft_trains_eos_at_each_round_boundary(tmp_path):
    from jaxllm.tokenizer import Tokenizer, get_chat_template
    from jaxllm.train.loss import lm_loss, token_nll

    tok = Tokenizer(BAICHUAN)
    texts = [("你好", "您好！"), ("再见", "拜拜")]
    turns = [(tok.encode(u), tok.encode(r)) for u, r in texts]
    messages = [m for u, r in texts for m in ({"role": "user", "content": u}, {"role": "assistant", "content": r})]
    # hand-built from the spec: [195] 你好 [196] 您好！ [195] 再见 [196] 拜拜 [EOS], where 您好！'s last
    # token is trained to predict EOS (not the 195 that follows in the input)
    (u1, r1), (u2, r2) = turns
    ids, labels, mask = get_chat_template("baichuan2-chat").render_labels(tok, messages)
    assert ids == [195, *u1, 196, *r1, 195, *u2, 196, *r2, 2]
    boundary = 2 + len(u1) + len(r1)
    assert (ids[boundary], labels[boundary], mask[boundary]) == (195, 2, 1)
    assert [i for i, (a, b) in enumerate(zip(ids, labels)) if a != b] == [boundary]

    path = write_jsonl(tmp_path / "bc.jsonl", [{"messages": messages}])
    examples, _ = encode_sft([path], tok, get_chat_template("baichuan2-chat"), seq_len=32)
    rows = pack_examples(examples, seq_len=32)
    tokens, targets = official_baichuan2_sft(turns)
    n = len(tokens)
    np.testing.assert_array_equal(rows["tokens"][0, :n], tokens)
    trained = np.asarray(targets) != -100
    np.testing.assert_array_equal(rows["loss_mask"][0, :n], trained.astype(np.float32))
    np.testing.assert_array_equal(rows["targets"][0, :n][trained], np.asarray(targets)[trained])
    assert rows["targets"][0, boundary - 1] == 2 and rows["loss_mask"][0, boundary - 1] == 1

    # the loss is the official one: mean CE over the official labels
    cfg = get_preset("llama2-tiny", vocab_size=tok.vocab_size)
    params = init_params(cfg, jax.random.key(0))
    batch = {k: jnp.asarray(v) for k, v in rows.items()}

    @jax.jit
    def ours_and_official(params):
        nll = token_nll(forward(cfg, params, jnp.asarray([tokens])), jnp.asarray([np.where(trained, targets, 0)]))
        return lm_loss(cfg)(params, batch, None)[0], jnp.sum(nll[0] * trained) / trained.sum()

    loss, expected = ours_and_official(params)
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-5)


def test_a_conversation_the_template_refuses_is_a_bad_record(tmp_path):
    from jaxllm.tokenizer import Tokenizer, get_chat_template

    tok = Tokenizer(Path(__file__).parent / "data" / "llama2-32k.model")
    path = write_jsonl(tmp_path / "tags.jsonl", [{"instruction": "hi", "output": "there"},
                                                 {"instruction": "say [/INST] now", "output": "no"}])
    examples, stats = encode_sft([path], tok, get_chat_template("llama2-chat"), seq_len=64)
    assert len(examples) == 1 and stats.skipped == 1
    with pytest.raises(DataFormatError, match=f"{path}:2: message 0 \\(user\\) contains the Llama 2 chat tag '\\[/INST\\]'"):
        encode_sft([path], tok, get_chat_template("llama2-chat"), seq_len=64, on_error="raise")


def test_the_sft_sample_has_a_multi_turn_sharegpt_conversation():
    from jaxllm.tokenizer import Tokenizer, get_chat_template

    sample = Path(__file__).resolve().parent.parent / "jaxllm" / "assets" / "stages" / "sft_sample.jsonl"
    records = [json.loads(line) for line in sample.read_text("utf-8").splitlines()]
    multi = [r for r in records if "conversations" in r and sum(t["from"] == "gpt" for t in r["conversations"]) >= 2]
    assert multi
    tok = Tokenizer.load(Path(__file__).resolve().parent.parent / "jaxllm" / "assets" / "demo" / "tokenizer.model")
    path = sample.parent / "sft_sample.jsonl"
    examples, stats = encode_sft([path], tok, get_chat_template("llama2-chat"), seq_len=256)
    assert stats.skipped == 0 and stats.truncated == 0 and len(examples) == len(records)
    index = records.index(multi[0])
    ids, mask, labels = examples[index]
    replies = sum(t["from"] == "gpt" for t in multi[0]["conversations"])
    assert sum(1 for i, m in zip(labels, mask) if m and i == tok.eos_id) == replies  # every reply is learned
