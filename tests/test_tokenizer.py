"""Tokenizers: the real Llama 2 model, Baichuan 2-recipe training, Ziya-style extension, chat templates."""
import gzip
import io
import json
import pickle
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from jaxllm.cli import main as cli
from jaxllm.tokenizer import (Tokenizer, TokenizerError, extend_tokenizer, get_chat_template, padded_rows,
                              pieces_of, resize_checkpoint, template_for_family, tokenizer_stats, train_tokenizer)

DATA = Path(__file__).parent / "data"
LLAMA = DATA / "llama2-32k.model"
BAICHUAN = DATA / "baichuan-64k.model"
CORPUS = DATA / "mixed_corpus.txt"


@pytest.fixture(scope="module")
def llama():
    return Tokenizer.load(LLAMA)


@pytest.fixture(scope="module")
def baichuan():
    return Tokenizer.load(BAICHUAN)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "bc2.model"
    return train_tokenizer([CORPUS], out, vocab_size=700, user_defined_symbols=["<human>", "<bot>"])


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A llama2-tiny jaxllm checkpoint with the Llama 2 vocabulary (32,000 rows)."""
    from jaxllm.checkpoint import save_params
    from jaxllm.models import get_preset, init_params

    cfg = get_preset("llama2-tiny", vocab_size=32000)
    params = jax.tree.map(np.asarray, init_params(cfg, jax.random.key(0)))
    path = tmp_path_factory.mktemp("ckpt") / "llama2-tiny"
    save_params(path, params, cfg)
    return path, params


def llama_cases():
    """(text, expected ids) of llama.cpp's vocab test: every case in .cases is followed by the separator
    (so the file ends with one), and .expected has one line per case."""
    separator = "\n__ggml_vocab_test__\n"
    text = (DATA / "llama2-32k.cases").read_text("utf-8")
    lines = (DATA / "llama2-32k.expected").read_text("utf-8")
    assert text.endswith(separator) and lines.endswith("\n")
    cases, expected = text[:-len(separator)].split(separator), lines[:-1].split("\n")
    assert len(cases) == len(expected)
    return list(zip(cases, expected))


def test_llama2_reproduces_every_expected_case(llama):
    cases = llama_cases()
    assert len(cases) == 46  # 46 real cases, one of them the empty string (case 2, no ids)
    assert [i for i, (text, _) in enumerate(cases) if not text] == [2] and cases[2][1] == ""
    expected = [[int(x) for x in ids.split()] for _, ids in cases]
    for (text, _), ids in zip(cases, expected):
        assert llama.encode(text) == ids, repr(text)
    assert llama.encode_batch([text for text, _ in cases]) == expected
    assert llama.decode_batch(expected[:5]) == [text for text, _ in cases[:5]]


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
    assert llama.is_byte(3) and not llama.is_byte(260) and not llama.is_byte(32000)
    assert pickle.loads(pickle.dumps(llama)).encode("你好") == llama.encode("你好")  # grain workers pickle it
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
    assert spec.input_sentence_size == 10_000_000 and list(spec.user_defined_symbols) == ["<human>", "<bot>"]
    assert proto.normalizer_spec.name == "identity" and not proto.normalizer_spec.add_dummy_prefix
    assert not proto.normalizer_spec.remove_extra_whitespaces
    tok = Tokenizer(trained)
    assert tok.vocab_size == 700
    assert [tok.id_to_piece(i) for i in tok.encode("2023")] == ["2", "0", "2", "3"]
    assert [tok.id_to_piece(i)[0] for i in tok.encode("The quick")][:1] == ["T"]  # no dummy prefix "▁"
    assert "▁▁" in [tok.id_to_piece(i) for i in tok.encode("    return 0")]  # whitespace-only pieces (code)
    assert tok.encode("<human>") == [tok.piece_to_id("<human>")]  # user-defined: atomic
    unseen = "龘"  # not in the corpus → UTF-8 bytes
    pieces = [tok.id_to_piece(i) for i in tok.encode(unseen)]
    assert pieces == [f"<0x{b:02X}>" for b in unseen.encode()]
    assert tok.decode(tok.encode("hello 龘 world")) == "hello 龘 world"


def test_training_streams_jsonl_with_a_sentence_cap_and_reserved_ids(tmp_path):
    records = tmp_path / "corpus.jsonl.gz"
    lines = CORPUS.read_text("utf-8").splitlines()
    with gzip.open(records, "wt", encoding="utf-8") as f:
        for a, b in zip(lines[0::2], lines[1::2]):
            f.write(json.dumps({"content": f"{a}\n{b}"}, ensure_ascii=False) + "\n")
    out = train_tokenizer([records], tmp_path / "r.model", vocab_size=800, text_field="content",
                          max_sentences=200, reserved=194)
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(out.read_bytes())
    assert proto.trainer_spec.input_sentence_size == 200  # a uniform sample of 200 of the 288 lines
    tok = Tokenizer(out)
    assert [tok.id_to_piece(i) for i in (3, 195, 196, 197)] == ["<reserved_0>", "<reserved_192>",
                                                                  "<reserved_193>", "<0x00>"]
    # baichuan2-chat needs ids 195/196 free of text: this model has them, the Llama 2 model does not.
    msgs = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "您好"}]
    ids, _ = get_chat_template("baichuan2-chat").render(tok, msgs)
    assert ids[0] == 195 and 196 in ids and 195 in get_chat_template("baichuan2-chat").stop_ids(tok)
    with pytest.raises(TokenizerError, match=r"ids 195/196, but .*llama2-32k.model has byte piece '<0xC0>'"):
        get_chat_template("baichuan2-chat").render(Tokenizer(LLAMA), msgs)


def test_the_sentence_cap_limits_what_training_sees(tmp_path):
    # Each line carries its own rare character six times; a sampled line makes it a piece, an unseen one
    # falls back to bytes. With a cap of 200 of 1000 lines exactly 200 markers can be pieces.
    markers = [chr(0x4E00 + 7 * i) for i in range(1000)]
    corpus = tmp_path / "markers.txt"
    corpus.write_text("".join(f"line {i % 10} says {m * 6} here\n" for i, m in enumerate(markers)), encoding="utf-8")
    tok = Tokenizer(train_tokenizer([corpus], tmp_path / "cap.model", vocab_size=1400, max_sentences=200))
    assert sum(len(tok.encode(m)) == 1 for m in markers) == 200
    full = Tokenizer(train_tokenizer([corpus], tmp_path / "full.model", vocab_size=1400))
    assert sum(len(full.encode(m)) == 1 for m in markers) == 1000  # the same recipe, uncapped, sees all


def test_training_bad_input(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(TokenizerError, match="empty corpus"):
        train_tokenizer([empty], tmp_path / "a.model", vocab_size=500)
    with pytest.raises(TokenizerError, match="smaller than the 256 byte-fallback pieces"):
        train_tokenizer([CORPUS], tmp_path / "b.model", vocab_size=200)
    with pytest.raises(TokenizerError, match="max_sentences=50 must be > 100"):
        train_tokenizer([CORPUS], tmp_path / "b.model", vocab_size=500, max_sentences=50)
    with pytest.raises(TokenizerError, match="sentencepiece training failed: .*[Vv]ocabulary size"):
        train_tokenizer([CORPUS], tmp_path / "b.model", vocab_size=50_000)  # more pieces than the text has
    bad = tmp_path / "bad.txt"
    bad.write_bytes("第一行\n".encode() + b"\xff\xfe\n")
    with pytest.raises(TokenizerError, match=r"bad.txt:2: not UTF-8"):
        train_tokenizer([bad], tmp_path / "c.model", vocab_size=500)
    with pytest.raises(TokenizerError, match="no such corpus file"):
        train_tokenizer([tmp_path / "nope.txt"], tmp_path / "d.model", vocab_size=500)
    (tmp_path / "broken.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(TokenizerError, match=r"broken.jsonl.gz:1: cannot read"):
        train_tokenizer([tmp_path / "broken.jsonl.gz"], tmp_path / "f.model", vocab_size=500)
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


def test_extension_keeps_old_ids_and_lowers_tokens_per_chinese_character(llama, tiny_checkpoint, tmp_path,
                                                                          capsys):
    from jaxllm.checkpoint import find_tokenizer, load_params
    from jaxllm.models import forward

    chars = chinese_characters(3000)
    out = extend_tokenizer(LLAMA, tmp_path / "ext.model", chars + ["▁", chars[0]],
                           special_tokens=["<human>", "<bot>"])
    ext = Tokenizer(out)
    added = ext.vocab_size - 32000
    assert 2000 < added <= 3002  # characters the base already had are skipped, duplicates dropped
    assert [ext.id_to_piece(i) for i in range(32000)] == [llama.id_to_piece(i) for i in range(32000)]
    assert ext.piece_to_id(chars[-1]) == ext.vocab_size - 3  # appended in order, before the two specials
    zh = "".join(line for line in CORPUS.read_text("utf-8").splitlines() if "\u4e00" <= line[0] <= "\u9fff")
    n_chars = sum("\u4e00" <= c <= "\u9fff" for c in zh)
    before, after = len(llama.encode(zh)) / n_chars, len(ext.encode(zh)) / n_chars
    with capsys.disabled():
        print(f"\n  tokens per Chinese character: Llama 2 {before:.3f} → extended {after:.3f} (+{added} pieces)")
    assert after < before * 0.8
    assert ext.decode(ext.encode(zh)) == zh
    english = "The quick brown fox jumps over the lazy dog."
    assert ext.encode(english) == llama.encode(english)  # text the base covered segments as before
    assert ext.piece_to_id("<human>") in ext.encode("<human>:你好")  # atomic (after the dummy prefix)

    src, params = tiny_checkpoint
    resized_dir = resize_checkpoint(src, tmp_path / "resized", ext.vocab_size, pad_multiple=16, tokenizer_path=out)
    resized, new_cfg = load_params(resized_dir)
    assert new_cfg.vocab_size == padded_rows(ext.vocab_size, 16) and new_cfg.vocab_size % 16 == 0
    assert new_cfg.tokenizer_vocab_size == ext.vocab_size
    np.testing.assert_array_equal(resized["embedding"][:32000], params["embedding"])
    np.testing.assert_array_equal(resized["lm_head"][:, :32000], params["lm_head"])
    mean = params["embedding"].mean(0)
    new_rows = resized["embedding"][32000:]
    np.testing.assert_allclose(new_rows, np.broadcast_to(mean, new_rows.shape), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(resized["lm_head"][:, -1], params["lm_head"].mean(1), rtol=1e-5, atol=1e-7)
    assert find_tokenizer(resized_dir) == resized_dir / "tokenizer.model"
    assert Tokenizer.load(resized_dir).vocab_size == ext.vocab_size
    tokens = jnp.asarray([ext.encode(zh[:20], bos=True)])
    assert int(tokens.max()) >= 32000  # the new rows are used
    logits = forward(new_cfg, resized, tokens)
    assert logits.shape == (*tokens.shape, new_cfg.vocab_size) and bool(jnp.isfinite(logits).all())
    with pytest.raises(TokenizerError, match="destination exists"):
        resize_checkpoint(src, resized_dir, ext.vocab_size)
    with pytest.raises(TokenizerError, match="smaller than the checkpoint's"):
        resize_checkpoint(resized_dir, tmp_path / "shrunk", 32000)
    with pytest.raises(TokenizerError, match=f"has {ext.vocab_size} pieces, not new_num_pieces=40000"):
        resize_checkpoint(src, tmp_path / "mismatch", 40000, tokenizer_path=out)


def test_extension_from_a_second_model_and_ziya_padding(llama, trained, tmp_path):
    out = extend_tokenizer(LLAMA, tmp_path / "merged.model", from_model=trained)
    merged = Tokenizer(out)
    theirs = [p for p in pieces_of(trained) if not llama.has_piece(p)]
    assert merged.vocab_size == 32000 + len(theirs) and theirs
    assert [merged.id_to_piece(i) for i in range(32000, merged.vocab_size)] == theirs
    assert "<human>" in theirs  # a user-defined piece of the second model stays atomic
    assert merged.piece_to_id("<human>") in merged.encode("a <human> b")
    assert padded_rows(39410, 16) == 39424 and padded_rows(32000, 64) == 32000  # Ziya: 39,410 → 39,424 rows
    with pytest.raises(TokenizerError, match="pad_multiple=0 must be >= 1"):
        padded_rows(10, 0)
    with pytest.raises(TokenizerError, match="missing.model: no such tokenizer file"):
        extend_tokenizer(tmp_path / "missing.model", tmp_path / "x.model", ["好"])


def test_llama2_chat_matches_the_spec(llama):
    t = get_chat_template("llama2-chat")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]
    # [BOS] SP("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! ") [EOS], checked piece by piece:
    # ▁[ INST ] ▁<< SY S >> \n Be ▁brief . \n < </ SY S >> \n \n Hi ▁[ / INST ] ▁Hello ! ▁
    first = [518, 25580, 29962, 3532, 14816, 29903, 6778, 13, 3629, 11473, 29889, 13, 29966, 829, 14816, 29903,
             6778, 13, 13, 18567, 518, 29914, 25580, 29962]
    reply = [15043, 29991, 29871]  # the trailing space of the pair is a lone "▁" (29871, spec §3.2)
    bye = [518, 25580, 29962, 2648, 29872, 518, 29914, 25580, 29962]  # ▁[ INST ] ▁By e ▁[ / INST ]
    assert t.prompt(llama, msgs) == [1, *first, *reply, 2, 1, *bye]
    ids, mask = t.render(llama, msgs[:3])
    assert ids == [1, *first, *reply, 2]
    assert mask == [0] * (1 + len(first)) + [1] * (len(reply) + 1)
    assert t.stop_ids(llama) == [2]
    # Meta strips the merged first message as a whole: a system prompt's own spacing is kept
    spaced = [{"role": "system", "content": " Be brief. "}, *msgs[1:3]]
    meta = "[INST] <<SYS>>\n Be brief. \n<</SYS>>\n\nHi [/INST] Hello! "
    assert t.render(llama, spaced)[0] == [1, *llama.encode(meta), 2]


def test_baichuan2_chat_matches_the_spec(baichuan):
    tok = baichuan
    t = get_chat_template("baichuan2-chat")
    msgs = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "您好！"},
            {"role": "user", "content": "再见"}]
    # ▁你 好 | ▁ 您 好 ！ | ▁再 见  (the Baichuan 1 model: it has a dummy prefix, Baichuan 2's has none)
    hello, reply, bye = [9875, 31213], [31106, 31886, 31213, 74], [28734, 31580]
    assert [tok.encode(m["content"]) for m in msgs] == [hello, reply, bye]
    # build_chat_input: no BOS, no EOS between rounds, the prompt ends with the assistant id 196
    assert t.prompt(tok, msgs) == [195, *hello, 196, *reply, 195, *bye, 196]
    # fine-tune.py: input = [195] user [196] reply [EOS]; its labels train the reply and the final EOS
    ids, mask = t.render(tok, msgs[:2])
    assert ids == [195, *hello, 196, *reply, 2]
    assert mask == [0, 0, 0, 0, 1, 1, 1, 1, 1]
    system = [{"role": "system", "content": "简短"}, *msgs[:2]]
    assert t.render(tok, system)[0] == [*tok.encode("简短"), 195, *hello, 196, *reply, 2]
    assert t.stop_ids(tok) == [2, 195]


def test_ziya_and_plain_templates(llama):
    msgs = [{"role": "user", "content": " 写诗 "}, {"role": "assistant", "content": "床前明月光"}]
    # ▁< human >: 写 <E8 AF 97>(诗) \n < bot >:  — then the output on its own: ▁ <E5 BA 8A>(床) 前 明 月 光
    head = [529, 26029, 23917, 31479, 235, 178, 154, 13, 29966, 7451, 23917]
    output = [29871, 232, 189, 141, 30658, 30592, 30534, 30867]
    ids, mask = get_chat_template("ziya").render(llama, msgs)
    assert ids == [1, *head, *output, 2]
    assert mask == [0] * (1 + len(head)) + [1] * (len(output) + 1)
    assert get_chat_template("ziya").prompt(llama, msgs[:1]) == [1, *head]
    assert get_chat_template("ziya").stop_ids(llama) == [2]  # "<human>" is not one Llama piece
    ids, mask = get_chat_template("plain").render(llama, msgs)
    # ▁User : ▁ 写 <E8 AF 97> \n \n Ass istant : | ▁ <E5 BA 8A> 前 明 月 光
    assert ids == [1, 4911, 29901, 29871, 31479, 235, 178, 154, 13, 13, 7900, 22137, 29901, *output, 2]
    assert mask == [0] * 13 + [1] * (len(output) + 1)
    assert [template_for_family(f) for f in ("llama", "baichuan", "baichuan2", "ziya", "ctllm")] == [
        "llama2-chat", "baichuan2-chat", "baichuan2-chat", "ziya", "plain"]
    with pytest.raises(TokenizerError, match="unknown chat template 'llama2'.*did you mean 'llama2-chat'"):
        get_chat_template("llama2")


@pytest.mark.parametrize("tag", ["[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"])
@pytest.mark.parametrize("role", ["system", "user", "assistant"])
def test_llama2_chat_refuses_its_tags_inside_content(llama, tag, role):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]
    index = {"system": 0, "user": 3, "assistant": 2}[role]
    msgs[index] = {"role": role, "content": f"a {tag} b"}
    pattern = rf"message {index} \({role}\) contains the Llama 2 chat tag '{re.escape(tag)}'"
    with pytest.raises(TokenizerError, match=pattern):
        get_chat_template("llama2-chat").prompt(llama, msgs)
    if role != "user":
        with pytest.raises(TokenizerError, match=pattern):
            get_chat_template("llama2-chat").render(llama, msgs[:3])
    get_chat_template("ziya").prompt(llama, msgs)  # only Llama 2's template reserves them


@pytest.mark.parametrize("messages,message", [
    ([], "conversation is empty"),
    ([{"role": "assistant", "content": "x"}], "role 'assistant' where 'user' was expected"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}], "empty content"),
    ([{"role": "user", "content": "x"}], "must end with an assistant"),
])
def test_bad_conversations(llama, messages, message):
    with pytest.raises(TokenizerError, match=message):
        get_chat_template("llama2-chat").render(llama, messages)


# Rare and byte-fallback characters (龘, emoji), brackets and colons of the templates' own markers, newlines.
WORDS = st.text(alphabet=st.sampled_from(list("abcxyz 你好世界12龘诗]:[\n") + ["😀", "🎉"]), min_size=1,
                max_size=12).filter(str.strip)


@settings(max_examples=40, deadline=None)
@given(turns=st.lists(st.tuples(WORDS, WORDS), min_size=1, max_size=3), system=st.one_of(st.none(), WORDS),
       name=st.sampled_from(["llama2-chat", "baichuan2-chat", "ziya", "plain"]))
def test_loss_mask_covers_exactly_the_assistant_tokens(llama, baichuan, turns, system, name):
    tok = baichuan if name == "baichuan2-chat" else llama
    template = get_chat_template(name)
    msgs = ([{"role": "system", "content": system}] if system else [])
    for user, reply in turns:
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    ids, mask = template.render(tok, msgs)
    assert len(ids) == len(mask) and set(mask) <= {0, 1}
    runs, current = [], []
    for i, m in zip(ids, mask):
        if m and i != tok.eos_id:
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    assert [tok.decode(r).strip() for r in runs] == [reply.strip() for _, reply in turns]
    eos = [k for k, i in enumerate(ids) if i == tok.eos_id]
    assert all(mask[k] for k in eos)  # every EOS that ends a reply is learned
    assert len(eos) == (1 if name == "baichuan2-chat" else len(turns))  # Baichuan: only the final one
    # ...yet with the explicit labels every template trains each reply to end with EOS (Baichuan: at the
    # next round's 195), and elsewhere the labels are the ids
    full, labels, label_mask = template.render_labels(tok, msgs)
    assert full == ids and len(labels) == len(label_mask) == len(ids)
    assert sum(1 for i, m in zip(labels, label_mask) if m and i == tok.eos_id) == len(turns)
    assert all(a == b and m == n for a, b, m, n in zip(ids, labels, mask, label_mask) if a != 195 or name != "baichuan2-chat")
    # generation sees what training saw: the prompt for the last reply is a prefix of the full render
    prompt = template.prompt(tok, msgs[:-1])
    assert ids[:len(prompt)] == prompt and mask[len(prompt) - 1] == 0


def test_cli_commands(trained, tiny_checkpoint, tmp_path, capsys, monkeypatch):
    out = tmp_path / "cli.model"
    assert cli(["tokenizer", "train", str(CORPUS), "-o", str(out), "--vocab-size", "700", "--special", "<human>",
                "--reserved", "2"]) == 0
    assert "700 pieces" in capsys.readouterr().out
    assert [Tokenizer(out).id_to_piece(i) for i in (3, 4, 5)] == ["<reserved_0>", "<reserved_1>", "<human>"]
    assert cli(["tokenizer", "encode", "--model", str(LLAMA), "Hello world"]) == 0
    assert capsys.readouterr().out.split() == ["15043", "3186"]
    assert cli(["tokenizer", "encode", "--model", str(LLAMA), "--bos", "--pieces", "Hello world"]) == 0
    assert capsys.readouterr().out.split() == ["<s>", "▁Hello", "▁world"]
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello world\n"))
    assert cli(["tokenizer", "encode", "--model", str(LLAMA), "--eos", "-"]) == 0
    assert capsys.readouterr().out.split() == ["15043", "3186", "2"]
    assert cli(["tokenizer", "decode", "--model", str(LLAMA), "15043", "3186"]) == 0
    assert capsys.readouterr().out.strip() == "Hello world"
    monkeypatch.setattr("sys.stdin", io.StringIO("[1, 15043, 3186, 2, 32005]\n"))  # a pasted list; padded id
    assert cli(["tokenizer", "decode", "--model", str(LLAMA), "-"]) == 0
    assert capsys.readouterr().out.strip() == "Hello world"
    assert cli(["tokenizer", "stats", "--model", str(LLAMA), "--model", str(trained), str(CORPUS)]) == 0
    table = capsys.readouterr().out
    s = tokenizer_stats(Tokenizer(LLAMA), [CORPUS])
    assert "chars/token" in table and str(trained) in table and f"{s['chars_per_token']:.3f}" in table
    assert s["bytes_per_token"] > s["chars_per_token"] > 1

    pieces = tmp_path / "chars.txt"
    pieces.write_text("\n".join(chinese_characters(50)), encoding="utf-8")
    src, _ = tiny_checkpoint
    assert cli(["tokenizer", "extend", "--model", str(LLAMA), "-o", str(tmp_path / "x.model"),
                "--pieces-file", str(pieces), "--from-model", str(trained), "--special", "<bot>",
                "--checkpoint", str(src), "--checkpoint-out", str(tmp_path / "x-ckpt"), "--pad-multiple", "64"]) == 0
    n = Tokenizer(tmp_path / "x.model").vocab_size
    assert f"32000 → {n} pieces" in capsys.readouterr().out
    from jaxllm.checkpoint import read_model_config
    cfg = read_model_config(tmp_path / "x-ckpt")
    assert (cfg.tokenizer_vocab_size, cfg.vocab_size) == (n, padded_rows(n, 64))
    assert Tokenizer.load(tmp_path / "x-ckpt").vocab_size == n

    assert cli(["tokenizer", "encode", "--model", str(tmp_path / "missing.model"), "x"]) == 2
    assert "no such tokenizer file" in capsys.readouterr().err
    assert cli(["tokenizer", "decode", "--model", str(LLAMA), "1", "x"]) == 2
    assert "ids must be integers" in capsys.readouterr().err
    assert cli(["tokenizer", "extend", "--model", str(LLAMA), "-o", str(tmp_path / "y.model")]) == 2
    assert "nothing to add" in capsys.readouterr().err
    assert cli(["tokenizer", "train", str(tmp_path / "nope.txt"), "-o", str(out), "--vocab-size", "500"]) == 2
    assert "nope.txt: no such corpus file" in capsys.readouterr().err
    assert cli(["tokenizer", "stats", "--model", str(LLAMA), str(tmp_path / "nope.txt")]) == 2
    capsys.readouterr()

    binary = tmp_path / "binary.txt"
    binary.write_bytes("好\n".encode() + b"\xff\xfe\n")
    assert cli(["tokenizer", "extend", "--model", str(LLAMA), "-o", str(tmp_path / "b.model"),
                "--pieces-file", str(binary)]) == 2
    assert f"{binary}:2: not UTF-8 text" in capsys.readouterr().err
    # a bad --checkpoint is found before anything is written
    for extra, message in ((["--checkpoint", str(tmp_path / "nope")], "--checkpoint needs --checkpoint-out"),
                           (["--checkpoint", str(tmp_path / "nope"), "--checkpoint-out", str(tmp_path / "o")],
                            "nope: no such directory"),
                           (["--checkpoint", str(tmp_path), "--checkpoint-out", str(tmp_path / "o")],
                            "not a jaxllm checkpoint"),
                           (["--checkpoint", str(src), "--checkpoint-out", str(tmp_path / "x-ckpt")],
                            "x-ckpt: destination exists")):
        assert cli(["tokenizer", "extend", "--model", str(LLAMA), "-o", str(tmp_path / "c.model"),
                    "--pieces-file", str(pieces), *extra]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "c.model").exists() and not (tmp_path / "o").exists()
    assert not list(tmp_path.glob(".c.model.*"))  # no temporary file left behind


# ---- Added tokens and add_bos_token from the HF files beside a tokenizer.model (Ziya, Baichuan) ----------

def write_ziya_tokenizer(directory, *, add_bos=True):
    """Ziya's tokenizer directory (spec §8): LLaMA's 32,000 pieces + 7,408 Chinese characters = 39,408
    sentencepiece pieces, `<human>` / `<bot>` as added tokens 39408 / 39409 in added_tokens.json, and the
    tokenizer_config.json / special_tokens_map.json transformers 4.28 wrote for a LLaMA tokenizer."""
    llama = Tokenizer(LLAMA)
    chars = [chr(c) for c in range(0x4E00, 0x9FA6) if not llama.has_piece(chr(c))][:7408]
    directory.mkdir(parents=True, exist_ok=True)
    extend_tokenizer(LLAMA, directory / "tokenizer.model", chars)
    (directory / "added_tokens.json").write_text(json.dumps({"<human>": 39408, "<bot>": 39409}))
    special = lambda content: {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True,
                               "rstrip": False, "single_word": False}
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": add_bos, "add_eos_token": False, "bos_token": special("<s>"),
        "clean_up_tokenization_spaces": False, "eos_token": special("</s>"), "model_max_length": 2048,
        "pad_token": None, "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer", "unk_token": special("<unk>")}))
    (directory / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    return directory


@pytest.fixture(scope="module")
def ziya(tmp_path_factory):
    """(jaxllm's tokenizer, transformers' reference) from the same Ziya-shaped files.

    The reference is transformers' slow sentencepiece tokenizer (`SentencePieceBackend`, legacy): like the
    slow `LlamaTokenizer(use_fast=False)` Ziya's scripts load, it cuts added tokens out of the text and
    encodes each piece of text with sentencepiece itself. transformers 5's `AutoTokenizer` / `LlamaTokenizer`
    is a converted `tokenizers` BPE that drops the dummy prefix after an added token (":" 29901 instead of
    sentencepiece's "▁:" 584), and `LlamaTokenizer(vocab_file=...)` encodes everything to []."""
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    directory = write_ziya_tokenizer(tmp_path_factory.mktemp("ziya"))
    return Tokenizer.load(directory, family="ziya"), SentencePieceBackend.from_pretrained(directory)


ZIYA_QUERIES = ["写一首关于月亮的诗", "How are you? 你好！", "  spaces  around  ", "1+1=?\n换行", "表情😀和龘"]


def test_ziya_added_tokens_encode_id_for_id_as_transformers(ziya):
    ours, ref = ziya
    assert (ours.vocab_size, ref.vocab_size, len(ref)) == (39410, 39408, 39410)
    assert ours.encode("<human>") == [39408] and ours.encode("<bot>") == [39409]
    assert (ours.add_bos, ours.add_bos_source.endswith("tokenizer_config.json: add_bos_token")) == (True, True)
    template = get_chat_template("ziya")
    history = []
    for query, answer in zip(ZIYA_QUERIES, ZIYA_QUERIES[1:] + ["好"]):
        text = f"<human>:{query.strip()}\n<bot>:"
        assert ours.encode(text) == ref.encode(text), text
        assert ours.decode(ours.encode(text)) == text
        # Fengshenbang: [BOS] + tok(prompt) per turn, then tok(output) + [EOS], each part on its own
        history.append({"role": "user", "content": query})
        expected = [1] + sum((ref.encode(f"<human>:{m['content'].strip()}\n<bot>:") if m["role"] == "user"
                              else ref.encode(m["content"].strip()) + [2] for m in history), [])
        assert template.prompt(ours, history) == expected
        history.append({"role": "assistant", "content": answer})
        ids, mask = template.render(ours, history)
        assert ids == expected + ref.encode(answer.strip()) + [2]
        assert [i for i, m in zip(ids, mask) if not m].count(39408) == len(history) // 2
    assert template.stop_ids(ours) == [2, 39408]  # a reply ends where the model starts the next <human>
    free = "a<human>b <bot> c<human><bot>d"
    assert ours.encode(free) == ref.encode(free) and ours.decode(ours.encode(free)) == free
    ids, offsets = ours.encode_with_offsets(free)
    assert ids == ours.encode(free) and offsets[1] == (1, 8)  # `<human>` covers its own 7 bytes


def test_added_tokens_are_generable_and_decode(ziya):
    from jaxllm.inference import SamplingParams
    from jaxllm.inference.sampling import sample

    tok, _ = ziya
    logits = jnp.full((1, 39424), -5.0).at[0, 39409].set(5.0).at[0, 39420].set(9.0)  # 39420: a padded row
    token = sample(logits, jax.random.key(0), SamplingParams(temperature=0.0), vocab_limit=tok.vocab_size)
    assert int(token[0]) == 39409 and tok.decode([39408, 584, 39409, 39420]) == "<human>:<bot>"
    assert tok.id_to_piece(39409) == "<bot>" and tok.piece_to_id("<bot>") == 39409 and tok.has_piece("<bot>")
    assert not tok.is_byte(39409)


def test_add_bos_token_from_the_file_else_the_family_default(tmp_path, baichuan):
    directory = write_ziya_tokenizer(tmp_path / "ziya", add_bos=False)
    tok = Tokenizer.load(directory, family="ziya")
    assert tok.add_bos is False
    assert get_chat_template("ziya").prompt(tok, [{"role": "user", "content": "hi"}])[0] == 39408  # no BOS
    # a bare tokenizer.model (no HF files): the family's default, and the source says so
    (tmp_path / "bc").mkdir()
    shutil.copy(BAICHUAN, tmp_path / "bc" / "tokenizer.model")
    for family, expected in (("baichuan2", False), ("baichuan", True), ("llama", True), (None, True)):
        tok = Tokenizer.load(tmp_path / "bc", family=family)
        assert tok.add_bos is expected and tok.add_bos_source == (f"the {family} default" if family
                                                                 else "the sentencepiece default")
    # Baichuan-13B's own file says false, and wins over the family default
    (tmp_path / "bc" / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    assert Tokenizer.load(tmp_path / "bc", family="baichuan").add_bos is False
    # HF files belong to a `tokenizer.model`; a differently named model beside them ignores them
    shutil.copy(BAICHUAN, tmp_path / "bc" / "other.model")
    assert Tokenizer.load(tmp_path / "bc" / "other.model", family="baichuan").add_bos is True


@pytest.mark.parametrize("files,message", [
    ({"added_tokens.json": "{"}, r"added_tokens.json: invalid JSON"),
    ({"added_tokens.json": '{"<human>": "x"}'}, r"added_tokens.json: added token '<human>' must map to an "
                                                r"integer id >= 0, got 'x'"),
    ({"added_tokens.json": '{"<human>": 1000}'}, r"added_tokens.json: added token '<human>' has id 1000, which "
                                                 r"is the piece '.+' of tokenizer.model"),
    ({"added_tokens.json": '{"<human>": 64000}',
      "tokenizer_config.json": '{"added_tokens_decoder": {"64001": {"content": "<human>"}}}'},
     r"tokenizer_config.json: added token '<human>' has id 64001, but 64000 in .*added_tokens.json"),
    ({"tokenizer_config.json": '{"added_tokens_decoder": {"x": {"content": "<a>"}}}'},
     r"added_tokens_decoder\['x'\]: expected an integer id"),
    ({"tokenizer_config.json": '{"add_bos_token": "yes"}'}, r"'add_bos_token' must be true or false, got 'yes'"),
])
def test_bad_tokenizer_files_name_the_file_and_entry(tmp_path, files, message):
    shutil.copy(BAICHUAN, tmp_path / "tokenizer.model")
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(TokenizerError, match=message):
        Tokenizer.load(tmp_path)


def test_extending_a_tokenizer_with_added_tokens_is_refused(ziya, tmp_path):
    tok, _ = ziya
    with pytest.raises(TokenizerError, match=r"added token '<human>' has id 39408, past the 39408 pieces"):
        extend_tokenizer(tok.path, tmp_path / "x.model", ["新"])
