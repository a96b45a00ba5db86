"""`jaxllm generate | chat | eval` end to end on a tiny checkpoint with the real Llama 2 tokenizer."""
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
from jaxllm.models import forward, get_preset, init_params
from jaxllm.tokenizer import Tokenizer

DATA = Path(__file__).parent / "data"


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
    assert cli(["generate", "--checkpoint", str(directory), "--prompt", "Hello", "--max-new-tokens", "5",
                "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("Hello")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}, ensure_ascii=False) for p in ["你好", "Once", "a b c"]))
    out = tmp_path / "out.jsonl"
    assert cli(["generate", "--checkpoint", str(directory), "--prompts-file", str(prompts), "--output", str(out),
                "--max-new-tokens", "4", "--chat", "--batch-size", "2"]) == 0
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
    assert cli(["eval", "choice", "--checkpoint", str(directory)]) == 0
    assert "overall" in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "A": 1, "B": 2, "C": 3, "D": 4, "answer": "E"}) + "\n")
    assert cli(["eval", "choice", "--checkpoint", str(directory), str(bad)]) == 2
    assert f"{bad}:1: answer must be one of A-D" in capsys.readouterr().err


def test_chat_through_a_pseudo_terminal_answers_and_streams(checkpoint):
    pexpect = pytest.importorskip("pexpect")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "XLA_FLAGS": ""}
    child = pexpect.spawn(sys.executable, ["-m", "jaxllm.cli", "chat", "--checkpoint", str(checkpoint[0]),
                                           "--max-new-tokens", "6", "--temperature", "0"],
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
