"""Tokenizers: the real Llama 2 model, Baichuan 2-recipe training, Ziya-style extension, chat templates."""
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from jaxllm.cli import main as cli
from jaxllm.tokenizer import (Tokenizer, TokenizerError, extend_tokenizer, get_chat_template, resize_checkpoint,
                              template_for_family, tokenizer_stats, train_tokenizer)

DATA = Path(__file__).parent / "data"
LLAMA = DATA / "llama2-32k.model"
BAICHUAN = DATA / "baichuan-64k.model"
CORPUS = DATA / "mixed_corpus.txt"


@pytest.fixture(scope="module")
def llama():
    return Tokenizer.load(LLAMA)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "bc2.model"
    return train_tokenizer([CORPUS], out, vocab_size=700, user_defined_symbols=["<human>", "<bot>"])


def llama_cases():
    cases = (DATA / "llama2-32k.cases").read_text("utf-8").split("\n__ggml_vocab_test__\n")
    expected = (DATA / "llama2-32k.expected").read_text("utf-8").split("\n")
    return list(zip(cases, expected))


def test_llama2_reproduces_every_expected_case(llama):
    cases = llama_cases()
    assert len(cases) == 47
    for text, ids in cases:
        assert llama.encode(text) == [int(x) for x in ids.split()], repr(text)


def test_ids_and_loading(llama, tmp_path):
    assert (llama.vocab_size, llama.bos_id, llama.eos_id, llama.unk_id, llama.pad_id) == (32000, 1, 2, 0, 0)
    assert llama.encode("hi", bos=True, eos=True) == [1, *llama.encode("hi"), 2]
    assert llama.encode_batch(["hi", "there"]) == [llama.encode("hi"), llama.encode("there")]
    assert llama.decode(llama.encode("Hello 世界") + [32000, 39423]) == "Hello 世界"  # padded rows skipped
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    shutil.copy(LLAMA, hf_dir / "tokenizer.model")
    assert Tokenizer.load(hf_dir).vocab_size == 32000
    with pytest.raises(TokenizerError, match="no such tokenizer file"):
        Tokenizer.load(tmp_path / "missing.model")
    with pytest.raises(TokenizerError, match="has no tokenizer.model"):
        Tokenizer.load(tmp_path)
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="junk.model: not a sentencepiece model"):
        Tokenizer.load(tmp_path / "junk.model")


def test_trained_model_carries_the_baichuan2_recipe(trained):
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(Path(trained).read_bytes())
    spec = proto.trainer_spec
    assert spec.model_type == sp_pb2.TrainerSpec.BPE
    assert spec.split_digits and spec.byte_fallback and spec.allow_whitespace_only_pieces
    assert spec.max_sentencepiece_length == 32
    assert spec.character_coverage == pytest.approx(0.9999)
    assert proto.normalizer_spec.name == "identity" and not proto.normalizer_spec.add_dummy_prefix
    tok = Tokenizer(trained)
    assert tok.vocab_size == 700
    assert [tok.id_to_piece(i) for i in tok.encode("2023")] == ["2", "0", "2", "3"]
    assert tok.encode("<human>") == [tok.piece_to_id("<human>")]  # user-defined: atomic
    unseen = "龘"  # not in the corpus → UTF-8 bytes
    pieces = [tok.id_to_piece(i) for i in tok.encode(unseen)]
    assert pieces == [f"<0x{b:02X}>" for b in unseen.encode()]
    assert tok.decode(tok.encode("hello 龘 world")) == "hello 龘 world"


def test_training_bad_input(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(TokenizerError, match="empty corpus"):
        train_tokenizer([empty], tmp_path / "a.model", vocab_size=500)
    with pytest.raises(TokenizerError, match="smaller than the 256 byte-fallback pieces"):
        train_tokenizer([CORPUS], tmp_path / "b.model", vocab_size=200)
    bad = tmp_path / "bad.txt"
    bad.write_bytes("第一行\n".encode() + b"\xff\xfe\n")
    with pytest.raises(TokenizerError, match=r"bad.txt:2: not UTF-8"):
        train_tokenizer([bad], tmp_path / "c.model", vocab_size=500)
    with pytest.raises(TokenizerError, match="no such corpus file"):
        train_tokenizer([tmp_path / "nope.txt"], tmp_path / "d.model", vocab_size=500)
    records = tmp_path / "c.jsonl"
    records.write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(TokenizerError, match=r"c.jsonl:1: no string field 'text'"):
        train_tokenizer([records], tmp_path / "e.model", vocab_size=500)


def chinese_characters(n):
    """Characters of the corpus first, then CJK unified ideographs in code-point order."""
    seen = dict.fromkeys(c for c in CORPUS.read_text("utf-8") if "\u4e00" <= c <= "\u9fff")
    for code in range(0x4E00, 0x9FA6):
        if len(seen) >= n:
            break
        seen.setdefault(chr(code))
    return list(seen)


def test_extension_keeps_old_ids_and_lowers_tokens_per_chinese_character(llama, tmp_path, capsys):
    from jaxllm.checkpoint import load_params, save_params
    from jaxllm.models import forward, get_preset, init_params

    chars = chinese_characters(3000)
    out = extend_tokenizer(LLAMA, tmp_path / "ext.model", chars + ["▁"], special_tokens=["<human>", "<bot>"])
    ext = Tokenizer(out)
    added = ext.vocab_size - 32000
    assert 2000 < added <= 3002  # characters the base already had are skipped, duplicates dropped
    for i in range(32000):
        assert ext.id_to_piece(i) == llama.id_to_piece(i)
    zh = "".join(line for line in CORPUS.read_text("utf-8").splitlines() if "\u4e00" <= line[0] <= "\u9fff")
    n_chars = sum("\u4e00" <= c <= "\u9fff" for c in zh)
    before, after = len(llama.encode(zh)) / n_chars, len(ext.encode(zh)) / n_chars
    with capsys.disabled():
        print(f"\n  tokens per Chinese character: Llama 2 {before:.3f} → extended {after:.3f} (+{added} pieces)")
    assert after < before * 0.8
    assert ext.decode(ext.encode(zh)) == zh
    assert ext.piece_to_id("<human>") in ext.encode("<human>:你好")  # atomic (after the dummy prefix)

    cfg = get_preset("llama2-tiny", vocab_size=32000)
    params = init_params(cfg, jax.random.key(0))
    save_params(tmp_path / "ckpt", jax.tree.map(np.asarray, params), cfg)
    resized_dir = resize_checkpoint(tmp_path / "ckpt", tmp_path / "resized", ext.vocab_size, pad_multiple=16,
                                    tokenizer_path=out)
    resized, new_cfg = load_params(resized_dir)
    assert new_cfg.vocab_size % 16 == 0 and new_cfg.vocab_size >= ext.vocab_size
    assert new_cfg.tokenizer_vocab_size == ext.vocab_size
    np.testing.assert_array_equal(resized["embedding"][:32000], params["embedding"])
    np.testing.assert_allclose(resized["embedding"][32000], np.asarray(params["embedding"]).mean(0), rtol=1e-5)
    assert (resized_dir / "tokenizer.model").is_file()
    logits = forward(new_cfg, resized, jnp.asarray([ext.encode(zh[:20], bos=True)]))
    assert logits.shape[-1] == new_cfg.vocab_size and bool(jnp.isfinite(logits).all())
    with pytest.raises(TokenizerError, match="destination exists"):
        resize_checkpoint(tmp_path / "ckpt", tmp_path / "resized", ext.vocab_size)


def test_llama2_chat_matches_the_spec(llama):
    t = get_chat_template("llama2-chat")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]
    first = "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]"
    expected_prompt = [1, *llama.encode(first + " Hello! "), 2, 1, *llama.encode("[INST] Bye [/INST]")]
    assert t.prompt(llama, msgs) == expected_prompt
    ids, mask = t.render(llama, msgs[:3])
    assert ids == [1, *llama.encode(first + " Hello! "), 2]
    n_prompt = len(llama.encode(first))
    assert mask == [0] * (1 + n_prompt) + [1] * (len(ids) - 1 - n_prompt)
    assert llama.decode([i for i, m in zip(ids, mask) if m]).strip() == "Hello!"


def test_baichuan2_chat_matches_the_spec():
    tok = Tokenizer.load(BAICHUAN)
    t = get_chat_template("baichuan2-chat")
    msgs = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "您好！"},
            {"role": "user", "content": "再见"}]
    assert t.prompt(tok, msgs) == [195, *tok.encode("你好"), 196, *tok.encode("您好！"), 195, *tok.encode("再见"), 196]
    ids, mask = t.render(tok, msgs[:2])
    assert ids == [195, *tok.encode("你好"), 196, *tok.encode("您好！"), 2]  # no BOS; EOS ends the SFT sample
    assert mask == [0] * (2 + len(tok.encode("你好"))) + [1] * (len(tok.encode("您好！")) + 1)


def test_ziya_and_plain_templates(llama):
    msgs = [{"role": "user", "content": " 写诗 "}, {"role": "assistant", "content": "床前明月光"}]
    ids, mask = get_chat_template("ziya").render(llama, msgs)
    assert ids == [1, *llama.encode("<human>:写诗\n<bot>:床前明月光"), 2]
    assert llama.decode([i for i, m in zip(ids, mask) if m]) == "床前明月光"
    assert get_chat_template("ziya").prompt(llama, msgs[:1]) == [1, *llama.encode("<human>:写诗\n<bot>:")]
    ids, mask = get_chat_template("plain").render(llama, msgs)
    assert ids == [1, *llama.encode("User: 写诗\n\nAssistant: 床前明月光"), 2]
    assert [template_for_family(f) for f in ("llama", "baichuan2", "ziya", "ctllm")] == [
        "llama2-chat", "baichuan2-chat", "ziya", "plain"]
    with pytest.raises(TokenizerError, match="unknown chat template 'llama2'.*did you mean 'llama2-chat'"):
        get_chat_template("llama2")


@pytest.mark.parametrize("messages,message", [
    ([], "conversation is empty"),
    ([{"role": "assistant", "content": "x"}], "role 'assistant' where 'user' was expected"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}], "empty content"),
    ([{"role": "user", "content": "x"}], "must end with an assistant"),
])
def test_bad_conversations(llama, messages, message):
    with pytest.raises(TokenizerError, match=message):
        get_chat_template("llama2-chat").render(llama, messages)


WORDS = st.text(alphabet=st.sampled_from(list("abcxyz 你好世界12")), min_size=1, max_size=12).filter(str.strip)


@settings(max_examples=30, deadline=None)
@given(turns=st.lists(st.tuples(WORDS, WORDS), min_size=1, max_size=3), system=st.one_of(st.none(), WORDS),
       name=st.sampled_from(["llama2-chat", "baichuan2-chat", "ziya", "plain"]))
def test_loss_mask_covers_exactly_the_assistant_tokens(llama, turns, system, name):
    msgs = ([{"role": "system", "content": system}] if system else [])
    for user, reply in turns:
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    ids, mask = get_chat_template(name).render(llama, msgs)
    assert len(ids) == len(mask)
    runs, current = [], []
    for i, m in zip(ids, mask):
        if m and i not in (llama.eos_id,):
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    assert [llama.decode(r).strip() for r in runs] == [reply.strip() for _, reply in turns]
    eos_positions = [k for k, i in enumerate(ids) if i == llama.eos_id]
    assert all(mask[k] for k in eos_positions)  # every EOS that ends a reply is learned


def test_cli_commands(trained, tmp_path, capsys):
    out = tmp_path / "cli.model"
    assert cli(["tokenizer", "train", str(CORPUS), "-o", str(out), "--vocab-size", "700"]) == 0
    assert "700 pieces" in capsys.readouterr().out
    assert cli(["tokenizer", "encode", "--model", str(LLAMA), "Hello world"]) == 0
    assert capsys.readouterr().out.split() == ["15043", "3186"]
    assert cli(["tokenizer", "encode", "--model", str(LLAMA), "--bos", "--pieces", "Hello world"]) == 0
    assert capsys.readouterr().out.split() == ["<s>", "▁Hello", "▁world"]
    assert cli(["tokenizer", "decode", "--model", str(LLAMA), "15043", "3186"]) == 0
    assert capsys.readouterr().out.strip() == "Hello world"
    assert cli(["tokenizer", "stats", "--model", str(LLAMA), "--model", str(trained), str(CORPUS)]) == 0
    table = capsys.readouterr().out
    assert "chars/token" in table and str(trained) in table
    pieces = tmp_path / "chars.txt"
    pieces.write_text("\n".join(chinese_characters(50)), encoding="utf-8")
    assert cli(["tokenizer", "extend", "--model", str(LLAMA), "-o", str(tmp_path / "x.model"),
                "--pieces-file", str(pieces), "--special", "<human>"]) == 0
    assert "32000 →" in capsys.readouterr().out
    assert cli(["tokenizer", "encode", "--model", str(tmp_path / "missing.model"), "x"]) == 2
    assert "no such tokenizer file" in capsys.readouterr().err
    assert cli(["tokenizer", "decode", "--model", str(LLAMA), "1", "x"]) == 2
    assert "ids must be integers" in capsys.readouterr().err
    assert cli(["tokenizer", "extend", "--model", str(LLAMA), "-o", str(tmp_path / "y.model")]) == 2
    assert "nothing to add" in capsys.readouterr().err
