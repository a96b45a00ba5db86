"""`jaxllm generate | chat | eval` end to end on a tiny checkpoint with the real Llama 2 tokenizer."""
import csv
import dataclasses
import json
import math
import os
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.checkpoint import save_params
from jaxllm.cli import main as cli
from jaxllm.eval.scoring import choice_accuracy, continuation_logprobs, perplexity, read_questions
from jaxllm.inference import FAMILY_DEFAULTS, generate
from jaxllm.inference.chat import ChatSession, fit_history
from jaxllm.inference.loading import load_model, serving_mesh
from jaxllm.models import forward, get_preset, init_params
from jaxllm.tokenizer import Tokenizer, get_chat_template, train_tokenizer

DATA = Path(__file__).parent / "data"
# What `--temperature 0 --max-new-tokens 8` gives a llama checkpoint (library calls share its programs).
GREEDY8 = dataclasses.replace(FAMILY_DEFAULTS["llama"], temperature=0.0, max_new_tokens=8)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckpt") / "tiny"
    cfg = get_preset("llama2-tiny", vocab_size=32000, max_position_embeddings=256)
    params = init_params(cfg, jax.random.key(0))
    save_params(directory, jax.tree.map(np.asarray, params), cfg)
    shutil.copy(DATA / "llama2-32k.model", directory / "tokenizer.model")
    return directory, cfg, params, Tokenizer.load(DATA / "llama2-32k.model")


def test_generate_prompt_and_prompts_file(checkpoint, tmp_path, capsys):
    directory = checkpoint[0]
    assert cli(["generate", "--checkpoint", str(directory), "--prompt", "Hello", "--max-new-tokens", "8",
                "--temperature", "0", "--mesh", "none"]) == 0
    assert capsys.readouterr().out.startswith("Hello")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}, ensure_ascii=False) for p in ["你好", "Once", "a b c"]))
    out = tmp_path / "out.jsonl"
    assert cli(["generate", "--checkpoint", str(directory), "--prompts-file", str(prompts), "--output", str(out),
                "--max-new-tokens", "4", "--chat", "--batch-size", "2", "--mesh", "none"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["你好", "Once", "a b c"] and all(1 <= r["tokens"] <= 4 for r in rows)


def test_generate_bad_input(checkpoint, tmp_path, capsys):
    assert cli(["generate", "--checkpoint", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "no such checkpoint directory" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    assert cli(["generate", "--checkpoint", str(checkpoint[0]), "--prompts-file", str(bad)]) == 2
    assert f"{bad}:2: expected" in capsys.readouterr().err


def test_perplexity_equals_mean_nll_of_full_forward(checkpoint, capsys):
    directory, cfg, params, tok = checkpoint
    texts = ["床前明月光，疑是地上霜。", "Language models predict the next token."]
    result = perplexity(cfg, params, tok, texts)
    nll, count = 0.0, 0
    for text in texts:
        ids = tok.encode(text, bos=True)
        logp = jax.nn.log_softmax(forward(cfg, params, jnp.asarray([ids]))[0])
        nll -= float(sum(logp[t, ids[t + 1]] for t in range(len(ids) - 1)))
        count += len(ids) - 1
    assert result["tokens"] == count
    np.testing.assert_allclose(result["perplexity"], math.exp(nll / count), rtol=1e-4)
    assert cli(["eval", "perplexity", "--checkpoint", str(directory), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["perplexity"] > 1


def test_choice_scores_each_letter_by_log_likelihood(checkpoint, tmp_path, capsys):
    directory, cfg, params, tok = checkpoint
    from jaxllm.eval.cli import ASSETS
    questions = read_questions(ASSETS / "sample_choice.jsonl")
    result = choice_accuracy(cfg, params, tok, questions)
    right = 0
    for q in questions:
        from jaxllm.eval.scoring import format_question
        scores = continuation_logprobs(cfg, params, tok, format_question(q), [" A", " B", " C", " D"])
        right += "ABCD"[int(np.argmax(scores))] == q["answer"]
    assert result["questions"] == 10 and result["accuracy"] == right / 10
    assert set(result["subjects"]) == {"history_zh", "science_en", "math_en"}
    assert cli(["eval", "choice", "--checkpoint", str(directory)]) == 0  # tensor-parallel over 8 devices
    assert "overall" in capsys.readouterr().out
    # data x fsdp x tensor, with batches of 3 padded to the 4 rows the batch axes split into
    assert cli(["eval", "choice", "--checkpoint", str(directory), "--json", "--mesh", "2,2,2",
                "--batch-size", "3"]) == 0
    assert json.loads(capsys.readouterr().out) == result
    assert cli(["eval", "choice", "--checkpoint", str(directory), "--mesh", "3,1,1"]) == 2
    assert "mesh: data*fsdp*tensor = 3 but 8 devices" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "A": 1, "B": 2, "C": 3, "D": 4, "answer": "E"}) + "\n")
    assert cli(["eval", "choice", "--checkpoint", str(directory), str(bad)]) == 2
    assert f"{bad}:1: answer must be one of A-D" in capsys.readouterr().err


def test_chat_through_a_pseudo_terminal_answers_and_streams(checkpoint):
    pexpect = pytest.importorskip("pexpect")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "XLA_FLAGS": ""}
    child = pexpect.spawn(sys.executable, ["-m", "jaxllm.cli", "chat", "--checkpoint", str(checkpoint[0]),
                                           "--max-new-tokens", "6", "--temperature", "0", "--stop", "User:"],
                          env=env, encoding="utf-8", timeout=180)
    try:
        child.expect("user> ")
        child.sendline("你好")
        child.expect("assistant> ")
        child.expect("user> ")  # the streamed reply ended and the prompt came back
        assert child.before.strip()
        child.sendline("/reset")
        child.expect("history cleared")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random transformers Llama saved as users have one: config.json, safetensors, tokenizer.model.
    Named and shaped like `checkpoint`, so its converted config equals that one and programs are shared."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    directory = tmp_path_factory.mktemp("hf") / "llama2-tiny"
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      rms_norm_eps=1e-5, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(directory)
    shutil.copy(DATA / "llama2-32k.model", directory / "tokenizer.model")
    return directory, model


def test_generate_from_an_hf_directory_equals_transformers_greedy(hf_dir, tmp_path):
    import torch

    directory, model = hf_dir
    out = tmp_path / "out.jsonl"
    assert cli(["generate", "--checkpoint", str(directory), "--prompt", "Hello", "--temperature", "0",
                "--max-new-tokens", "8", "--mesh", "none", "--output", str(out)]) == 0
    row = json.loads(out.read_text())
    tok = Tokenizer.load(directory)
    prompt = tok.encode("Hello", bos=True)
    with torch.no_grad():
        new = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                             pad_token_id=0)[0, len(prompt):].tolist()
    assert row["tokens"] == len(new) and row["completion"] == tok.decode([i for i in new if i != tok.eos_id])


def test_generate_stops_at_a_stop_string_and_counts_tokens_to_it(checkpoint, tmp_path):
    directory, cfg, params, tok = checkpoint
    free = generate(cfg, params, [tok.encode("Hello", bos=True)], GREEDY8, stop_ids=[tok.eos_id]).tokens[0]
    # the stop: the text one of the first tokens adds (not blank)
    added = [tok.decode(free[:k + 1])[len(tok.decode(free[:k])):] for k in range(1, 6)]
    stop = next(a for a in added if a.strip())
    expected = next(k for k in range(1, len(free) + 1) if stop in tok.decode(free[:k]))
    assert expected < GREEDY8.max_new_tokens
    out = tmp_path / "out.jsonl"
    assert cli(["generate", "--checkpoint", str(directory), "--prompt", "Hello", "--temperature", "0",
                "--max-new-tokens", "8", "--mesh", "none", "--stop", stop, "--output", str(out)]) == 0
    row = json.loads(out.read_text())
    text = tok.decode(free[:expected])
    assert row == {"prompt": "Hello", "completion": text[:text.index(stop)], "tokens": expected}


def test_generate_shards_over_all_devices_by_default(checkpoint, tmp_path, capsys):
    directory = checkpoint[0]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello\nOnce upon a time\n你好\n")
    texts = []
    for mesh in ([], ["--mesh", "none"]):  # batches of one prompt: the unsharded programs are other tests' too
        out = tmp_path / f"out{len(texts)}.jsonl"
        assert cli(["generate", "--checkpoint", str(directory), "--prompts-file", str(prompts), "--temperature", "0",
                    "--max-new-tokens", "8", "--batch-size", "1", *mesh, "--output", str(out)]) == 0
        texts.append(out.read_text())
    assert texts[0] == texts[1] and len(texts[0].splitlines()) == 3
    mesh = serving_mesh("auto")
    assert mesh.shape["tensor"] == len(jax.devices()) == 8
    _, params, _ = load_model(directory, mesh=mesh)
    assert params["lm_head"].addressable_shards[0].data.shape == (64, 32000 // 8)
    capsys.readouterr()
    assert cli(["generate", "--checkpoint", str(directory), "--prompt", "x", "--mesh", "3,1,1"]) == 2
    assert "mesh: data*fsdp*tensor = 3 but 8 devices" in capsys.readouterr().err
    assert cli(["generate", "--checkpoint", str(directory), "--prompt", "x", "--mesh", "tp"]) == 2
    assert "--mesh must be 'auto', 'none' or DATA,FSDP,TENSOR" in capsys.readouterr().err


def test_generate_never_emits_ids_the_tokenizer_lacks(checkpoint, tmp_path):
    """A 1,000-piece tokenizer on the 32,000-row model: rows 1,000+ are padding, made to win every step."""
    directory, cfg, params, _ = checkpoint
    tok = Tokenizer.load(train_tokenizer([DATA / "mixed_corpus.txt"], tmp_path / "small.model", 1000))
    emb, head = np.array(params["embedding"]), np.array(params["lm_head"])
    emb[:, 0], head[0, :], head[0, 1000:] = 100.0, 0.0, 50.0  # residual dim 0 large, read by the padded rows
    boosted = {**params, "embedding": emb, "lm_head": head}
    save_params(tmp_path / "padded", boosted, cfg)
    prompt = tok.encode("Hello", bos=True)
    unmasked = generate(cfg, boosted, [prompt], GREEDY8, stop_ids=[tok.eos_id]).tokens[0]
    assert all(t >= 1000 for t in unmasked)  # the test can fail
    masked = generate(cfg, boosted, [prompt], GREEDY8, stop_ids=[tok.eos_id], vocab_limit=1000).tokens[0]
    assert all(t < 1000 for t in masked)
    out = tmp_path / "out.jsonl"
    assert cli(["generate", "--checkpoint", str(tmp_path / "padded"), "--tokenizer", str(tok.path), "--prompt",
                "Hello", "--temperature", "0", "--max-new-tokens", "8", "--mesh", "none", "--output", str(out)]) == 0
    row = json.loads(out.read_text())
    assert row["tokens"] == len(masked) and row["completion"] == tok.decode([i for i in masked if i != tok.eos_id])


@pytest.fixture(scope="module")
def llama_chat():
    return get_chat_template("llama2-chat"), Tokenizer.load(DATA / "llama2-32k.model")


def test_fit_history_drops_the_oldest_pairs_and_keeps_the_system_prompt(llama_chat):
    template, tok = llama_chat
    system = {"role": "system", "content": "You are terse."}
    turns = [{"role": role, "content": f"{role} turn {k}, " * 4} for k in range(3) for role in ("user", "assistant")]
    last = {"role": "user", "content": "and the last question?"}
    messages = [system, *turns, last]
    full = template.prompt(tok, messages)
    assert fit_history(template, tok, messages, len(full)) == (full, messages)
    shorter = [system, *turns[2:], last]
    budget = len(template.prompt(tok, shorter))
    assert fit_history(template, tok, messages, budget) == (template.prompt(tok, shorter), shorter)
    assert fit_history(template, tok, messages, budget - 1)[1] == [system, *turns[4:], last]
    # a lone message longer than the budget keeps its last tokens
    long = [system, {"role": "user", "content": "word " * 50}]
    assert fit_history(template, tok, long, 20) == (template.prompt(tok, long)[-20:], long)


def test_chat_session_drops_empty_replies_and_ends_at_stop_strings(llama_chat):
    template, tok = llama_chat
    replies = iter([[tok.eos_id], tok.encode("Sure. User: more") + [tok.eos_id], tok.encode("Fine.") + [tok.eos_id]])
    consumed = []

    def respond(prompt):
        for token in next(replies):
            consumed.append(token)
            yield token

    session = ChatSession(template, tok, respond, budget=200, system="Be brief.", stop_strings=["User:"])
    system = {"role": "system", "content": "Be brief."}
    assert list(session.reply("hi")) == [] and session.last_reply == ""
    assert session.history == [system]  # neither the empty reply nor the message it answered is kept
    consumed.clear()
    pieces = list(session.reply("again"))
    assert "".join(pieces) == "Sure. " and not any("U" in p for p in pieces)  # "User" was held back, then cut
    assert consumed == tok.encode("Sure. User:")  # no token past the stop was asked for
    assert session.history == [system, {"role": "user", "content": "again"}, {"role": "assistant", "content": "Sure. "}]
    assert "".join(session.reply("next")) == "Fine." and len(session.history) == 5
    session.reset()
    assert session.history == [system]


def test_perplexity_over_windows_shorter_than_the_text(checkpoint, tmp_path, capsys):
    directory, cfg, params, tok = checkpoint
    text = "床前明月光，疑是地上霜。举头望明月，低头思故乡。Language models predict the next token."
    ids, seq_len = tok.encode(text, bos=True), 8
    assert len(ids) > 4 * seq_len
    logits = jax.jit(lambda t: forward(cfg, params, t))
    nll = 0.0
    for t in range(1, len(ids)):
        start = (t - 1) // (seq_len - 1) * (seq_len - 1)  # each window predicts seq_len - 1 tokens afresh
        context = ids[start:t]
        row = logits(jnp.asarray([context + [0] * (seq_len - len(context))]))[0, len(context) - 1]
        nll -= float(jax.nn.log_softmax(row)[ids[t]])
    result = perplexity(cfg, params, tok, [text], seq_len=seq_len)
    assert result["tokens"] == len(ids) - 1
    np.testing.assert_allclose(result["nll"], nll / (len(ids) - 1), rtol=1e-6)
    file = tmp_path / "long.txt"
    file.write_text(text)
    assert cli(["eval", "perplexity", "--checkpoint", str(directory), str(file), "--seq-len", "8", "--json"]) == 0
    np.testing.assert_allclose(json.loads(capsys.readouterr().out)["nll"], result["nll"], rtol=1e-6)
    assert cli(["eval", "perplexity", "--checkpoint", str(directory), str(file), "--seq-len", "8", "--json",
                "--mesh", "2,2,2", "--batch-size", "3"]) == 0
    np.testing.assert_allclose(json.loads(capsys.readouterr().out)["nll"], result["nll"], rtol=1e-6)
    assert cli(["eval", "perplexity", "--checkpoint", str(directory), str(file), "--seq-len", "1"]) == 2
    assert "seq_len must be >= 2" in capsys.readouterr().err


def test_choice_reads_headerless_mmlu_and_headed_ceval_csv(checkpoint, tmp_path, capsys):
    mmlu = tmp_path / "abstract_algebra_test.csv"
    with open(mmlu, "w", newline="") as f:  # MMLU's layout: no header, question,A,B,C,D,answer
        csv.writer(f).writerows([["Find the degree of Q(sqrt(2), sqrt(3)) over Q.", "0", "4", "2", "6", "B"],
                                 ["Which, of these, is prime?", "4", "6", "7", "9", "C"]])
    ceval = tmp_path / "computer_network_val.csv"
    with open(ceval, "w", newline="") as f:
        csv.writer(f).writerows([["id", "question", "A", "B", "C", "D", "answer", "explanation"],
                                 ["0", "TCP 属于哪一层？", "物理层", "传输层", "网络层", "应用层", "B", ""]])
    questions = read_questions(mmlu)
    assert [q["question"] for q in questions] == ["Find the degree of Q(sqrt(2), sqrt(3)) over Q.",
                                                  "Which, of these, is prime?"]
    assert questions[1]["options"] == ["4", "6", "7", "9"] and [q["answer"] for q in questions] == ["B", "C"]
    assert {q["subject"] for q in questions} == {"abstract_algebra"}
    assert [(q["options"][1], q["answer"], q["subject"]) for q in read_questions(ceval)] == [
        ("传输层", "B", "computer_network")]
    assert cli(["eval", "choice", "--checkpoint", str(checkpoint[0]), str(mmlu), str(ceval), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["questions"] == 3 and set(result["subjects"]) == {"abstract_algebra", "computer_network"}
    bad = tmp_path / "bad.csv"
    bad.write_text("q,1,2,3,A\n")
    with pytest.raises(ValueError, match=f"{bad}:1: expected a header .* got 5 columns"):
        read_questions(bad)
