"""`jaxllm serve` as a real server process on 127.0.0.1, driven by the official `openai` client: chat and
completions, streamed and not, stop strings, n > 1 and seeds, 16 concurrent clients getting exactly what
each gets alone, capacity (503) and disconnecting clients freeing their slots, bad requests (400/401/404/
413 with a message), SIGTERM finishing the requests in flight, and answers equal to `generate`'s;
log-probabilities (echo, generated, chat, streamed, concurrent) equal to the full forward's, and the real
lm-evaluation-harness scoring through the server (local tasks from harness_tasks.py). One
server for the module: a tiny Llama 2 checkpoint with a LoRA adapter on top and the real Llama 2
tokenizer, 4 slots on one device (test_serve_engine.py runs the engine on a mesh; 8 fake devices on 2
cores would only slow every step here)."""
import concurrent.futures
import json
import shutil
import signal
import time
from pathlib import Path

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from harness_tasks import start_server
from jaxllm.lora import files as adapters
from jaxllm.checkpoint import save_params
from jaxllm.cli import main as cli
from jaxllm.config import LoraSpec
from jaxllm.inference import SamplingParams, generate
from jaxllm.inference.detokenize import TextStream
from jaxllm.inference.loading import load_model
from jaxllm.lora.model import leaf_paths, split, trainable_mask
from jaxllm.models import forward, get_preset, init_params
from jaxllm.tokenizer import Tokenizer, get_chat_template

openai = pytest.importorskip("openai")

DATA = Path(__file__).parent / "data"
KEY = "test-key"
LONG = {"ignore_eos": True}  # runs to max_tokens whatever the random model says


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("serve") / "tiny"
    # big enough that a step takes milliseconds: the disconnect test must outpace the requests it cancels
    cfg = get_preset("llama2-tiny", vocab_size=32000, hidden_size=256, intermediate_size=512, num_layers=4,
                     max_position_embeddings=256)
    save_params(directory, jax.tree.map(np.asarray, init_params(cfg, jax.random.key(0))), cfg)
    shutil.copy(DATA / "llama2-32k.model", directory / "tokenizer.model")
    return directory


@pytest.fixture(scope="module")
def adapter(checkpoint):
    """A LoRA adapter (random nonzero A and B on every projection) for the checkpoint, as a LoRA run saves it."""
    directory = checkpoint.parent / "adapter"
    config = get_preset("llama2-tiny", vocab_size=32000, hidden_size=256, intermediate_size=512, num_layers=4,
                        max_position_embeddings=256, lora=LoraSpec(rank=4, alpha=8.0))
    full = init_params(config, jax.random.key(1))
    trained, _ = split(full, trainable_mask(full))
    rng = np.random.default_rng(1)
    leaves = {p: (0.2 * rng.standard_normal(x.shape)).astype(np.float32) if p[-1].endswith("_lora_b") else np.asarray(x)
              for p, x in zip(leaf_paths(trained), jax.tree.leaves(trained))}
    save_params(directory, adapters.nest(leaves), config)
    adapters.write_record(directory, base=str(checkpoint), base_digest=None)
    return directory


@pytest.fixture(scope="module")
def server(checkpoint, adapter, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-log") / "stderr.txt"
    try:
        proc = start_server(["--checkpoint", str(checkpoint), "--port", "0", "--model-name", "tiny", "--slots", "4",
                             "--max-len", "256", "--max-prompt-tokens", "48", "--max-requests", "16",
                             "--max-request-bytes", "20000", "--api-key", KEY, "--mesh", "none",
                             "--adapter", str(adapter)], log)
    except RuntimeError as err:
        pytest.fail(str(err))
    yield proc
    if proc.poll() is None:
        proc.terminate()
        proc.wait(60)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def health(server) -> dict:
    return httpx.get(server.url + "/health", timeout=10).json()


def wait_idle(server, within: float) -> dict:
    """/health once no request runs or waits (fails past `within` seconds)."""
    start = time.monotonic()
    while time.monotonic() - start < within:
        state = health(server)
        if state["running"] == 0 and state["waiting"] == 0:
            return state
        time.sleep(0.05)
    pytest.fail(f"still busy after {within} s: {health(server)}")


def test_models_health_and_api_key(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    assert health(server) == {"status": "ok", "slots": 4, "running": 0, "waiting": 0, "ended": {}}
    with pytest.raises(openai.AuthenticationError, match="API key"):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])


def test_the_server_runs_the_adapter_and_answers_as_generate_does(client, checkpoint, adapter):
    tok = Tokenizer.load(DATA / "llama2-32k.model")
    prompt = tok.encode("Once upon a time", bos=True)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=12)

    def text(ids):
        stream = TextStream(tok.decode, context=prompt[-8:])  # a completion continues its prompt
        return "".join(stream.add(i) for i in ids) + stream.finish()

    adapted = generate(*load_model(checkpoint, adapter=adapter)[:2], [prompt], greedy, stop_ids=[tok.eos_id]).tokens[0]
    base = generate(*load_model(checkpoint)[:2], [prompt], greedy, stop_ids=[tok.eos_id]).tokens[0]
    assert adapted != base  # the adapter matters
    reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
    assert reply.choices[0].text == text([i for i in adapted if i != tok.eos_id])
    assert reply.usage.completion_tokens == len(adapted)


def test_chat_streamed_and_not_agree_and_count_tokens(client):
    tok = Tokenizer.load(DATA / "llama2-32k.model")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好, who are you?"}]
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and choice.message.role == "assistant"
    assert reply.usage.prompt_tokens == len(get_chat_template("llama2-chat").prompt(tok, messages))
    assert 1 <= reply.usage.completion_tokens <= 12 and choice.finish_reason in ("stop", "length")
    assert (choice.finish_reason == "length") == (reply.usage.completion_tokens == 12)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [choice.finish_reason]
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_completions_stop_strings_n_and_seeds(client):
    base = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=24, temperature=0,
                                     extra_body=LONG)
    text = base.choices[0].text
    assert base.usage.completion_tokens == 24 and base.choices[0].finish_reason == "length" and len(text) > 12
    stop = text[6:10]
    cut = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=24, temperature=0,
                                    stop=[stop, "\u2603never"], extra_body=LONG)
    assert cut.choices[0].text == text[:text.find(stop)] and cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens < 24  # generation really ended there
    streamed = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=24, temperature=0,
                                         stop=stop, stream=True, extra_body=LONG)
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text
    hot = dict(model="tiny", prompt="The weather", max_tokens=10, temperature=1.0, top_p=0.95, seed=11, n=3,
               extra_body={"top_k": 40, **LONG})
    first, again = client.completions.create(**hot), client.completions.create(**hot)
    texts = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    assert [c.index for c in first.choices] == [0, 1, 2] and len(set(texts)) > 1
    assert texts == [c.text for c in sorted(again.choices, key=lambda c: c.index)]
    parts = {}
    for chunk in client.completions.create(**hot, stream=True):
        for c in chunk.choices:
            parts[c.index] = parts.get(c.index, "") + c.text
    assert [parts[i] for i in range(3)] == texts
    several = client.completions.create(model="tiny", prompt=[[1, 450, 14089], [1, 306]], max_tokens=3,
                                        temperature=0, n=2, extra_body=LONG)
    assert [c.index for c in several.choices] == [0, 1, 2, 3] and several.usage.prompt_tokens == 5
    assert several.choices[0].text == several.choices[1].text  # greedy: both choices agree


def test_16_concurrent_clients_get_exactly_what_each_gets_alone(client):
    def ask(k):
        if k % 2:
            reply = client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": f"Tell me about {k} cats"}],
                max_tokens=6 + 2 * k, temperature=0)
            return reply.choices[0].message.content, reply.usage.completion_tokens
        reply = client.completions.create(model="tiny", prompt=f"{k} little pigs " * (1 + k % 5),
                                          max_tokens=6 + 2 * k, temperature=0)
        return reply.choices[0].text, reply.usage.completion_tokens

    alone = [ask(k) for k in range(16)]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, range(16)))
    assert together == alone


def test_full_server_says_503_and_disconnecting_clients_free_their_slots(server, client):
    long = dict(model="tiny", messages=[{"role": "user", "content": "go on"}], max_tokens=230, temperature=0,
                extra_body=LONG)
    cancelled = lambda: health(server)["ended"].get("cancelled", 0)
    before = cancelled()
    streams = [client.chat.completions.create(**long, stream=True) for _ in range(16)]  # 4 run, 12 wait
    try:
        with pytest.raises(openai.InternalServerError, match="at capacity") as err:
            client.chat.completions.create(**long)
        assert err.value.status_code == 503
        state = health(server)
        assert state["running"] == 4 and state["waiting"] >= 8
    finally:
        for stream in streams:
            stream.close()
    wait_idle(server, within=10)
    assert cancelled() - before >= 12  # at most the first 4 could have finished: the rest were cancelled
    # A non-streaming client that gives up: its 4 choices are cancelled, not run to the end.
    before = cancelled()
    with pytest.raises(openai.APITimeoutError):
        client.with_options(timeout=0.3).chat.completions.create(**long, n=4)
    wait_idle(server, within=10)
    assert cancelled() - before == 4


def test_bad_requests_get_400_with_a_message(server, client):
    chat = dict(model="tiny", messages=[{"role": "user", "content": "hi"}])
    cases = [
        (dict(chat, temperature=3), "temperature"),
        (dict(chat, n=0), "'n'"),
        (dict(model="tiny", messages=[{"role": "assistant", "content": "hi"}]), "where 'user' was expected"),
        (dict(model="tiny", messages=[{"role": "user", "content": "[INST] x"}]), "Llama 2 chat tag"),
        (dict(model="tiny", messages=[{"role": "user", "content": "word " * 80}]), "takes at most 48"),
        (dict(chat, max_tokens=5000), "allows at most 2048"),
        (dict(chat, max_tokens=250), "context is 256 tokens"),
        (dict(chat, extra_body={"max_tokenz": 5}), "unrecognized request argument: max_tokenz"),
        (dict(chat, tools=[{"type": "function", "function": {"name": "f"}}]), "'tools' is not supported"),
        (dict(chat, frequency_penalty=0.5), "'frequency_penalty' is not supported"),
        (dict(chat, stop=[""]), "non-empty"),
    ]
    for request, message in cases:
        with pytest.raises(openai.BadRequestError, match=message) as err:
            client.chat.completions.create(**request)
        assert err.value.status_code == 400 and err.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match="outside the vocabulary"):
        client.completions.create(model="tiny", prompt=[1, 99999])
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    bad_json = httpx.post(server.url + "/v1/completions", content=b"{not json", headers=headers)
    assert bad_json.status_code == 400 and "not valid JSON" in bad_json.json()["error"]["message"]
    huge = httpx.post(server.url + "/v1/completions", headers=headers,
                      content=json.dumps({"model": "tiny", "prompt": "x" * 30000}).encode())
    assert huge.status_code == 413 and "20000 bytes" in huge.json()["error"]["message"]
    assert health(server)["running"] == 0


def test_serve_command_bad_input(checkpoint, capsys):
    assert cli(["serve", "--checkpoint", "/nonexistent/ckpt", "--port", "0"]) == 2
    assert "/nonexistent/ckpt: no such checkpoint directory" in capsys.readouterr().err
    assert cli(["serve", "--checkpoint", str(checkpoint), "--slots", "0"]) == 2
    assert "--slots must be >= 1, got 0" in capsys.readouterr().err
    assert cli(["serve", "--checkpoint", str(checkpoint), "--port", "0", "--adapter", "/nonexistent/lora"]) == 2
    assert "/nonexistent/lora: no such adapter directory" in capsys.readouterr().err
    assert cli(["serve", "--checkpoint", str(checkpoint), "--port", "0", "--max-len", "64",
                "--max-prompt-tokens", "64"]) == 2
    assert "--max-prompt-tokens must be in [1, 63]" in capsys.readouterr().err
    assert cli(["serve", "--checkpoint", str(checkpoint), "--port", "0", "--slots", "3", "--mesh", "2,1,4"]) == 2
    assert "slots (3) must be a multiple of the mesh's data x fsdp size (2)" in capsys.readouterr().err


def test_port_in_use_is_refused_at_once(server, checkpoint, capsys):
    port = server.url.rsplit(":", 1)[1]
    assert cli(["serve", "--checkpoint", str(checkpoint), "--port", port]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


# ---- log-probabilities and echo (what lm-evaluation-harness scores with) -----------------------------

@pytest.fixture(scope="module")
def reference(checkpoint, adapter):
    """log_softmax of the full forward (the adapted model the server runs): ids -> float32[len, vocab]."""
    config, params = load_model(checkpoint, adapter=adapter)[:2]
    return lambda ids: np.asarray(jax.nn.log_softmax(forward(config, params, jnp.asarray([ids]))[0], axis=-1))


def greedy_reference(reference, prompt, n):
    """n greedy ids after `prompt` by full forwards, and each one's log-probability."""
    ids, logprobs = list(prompt), []
    for _ in range(n):
        lp = reference(ids)[-1]
        ids.append(int(np.argmax(lp)))
        logprobs.append(float(lp[ids[-1]]))
    return ids[len(prompt):], logprobs


TOK = Tokenizer.load(DATA / "llama2-32k.model")


def post(server, path, body) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)


def test_echo_scores_the_prompt_as_the_full_forward(server, reference):
    prompt = TOK.encode("Once upon a time there was a little", bos=True)
    reply = post(server, "/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 0, "echo": True,
                                             "logprobs": 5}).json()
    choice = reply["choices"][0]
    lp, full = choice["logprobs"], reference(prompt)
    assert choice["text"] == TOK.decode(prompt) and reply["usage"]["completion_tokens"] == 0
    assert choice["finish_reason"] == "length" and len(lp["tokens"]) == len(prompt)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # nothing before the first token
    expected = [full[j - 1, prompt[j]] for j in range(1, len(prompt))]
    np.testing.assert_allclose(lp["token_logprobs"][1:], expected, atol=1e-4)
    texts = TextStream(TOK.decode)
    strings = ["".join(texts.add(i)) for i in prompt]  # the detokenizer's text, token by token
    assert lp["tokens"] == strings and "".join(strings) == choice["text"]
    assert lp["text_offset"] == [sum(map(len, strings[:k])) for k in range(len(prompt))]
    for j, top in enumerate(lp["top_logprobs"][1:], 1):
        assert len(top) in (5, 6) and top[lp["tokens"][j]] == lp["token_logprobs"][j]
        best = int(np.argmax(full[j - 1]))
        assert abs(max(top.values()) - full[j - 1, best]) < 1e-4  # the argmax is among them
    # a text prompt is echoed as given; several prompts in one request, each with its own logprobs
    both = post(server, "/v1/completions", {"model": "tiny", "prompt": ["Once upon a time", "The cat"],
                                            "max_tokens": 0, "echo": True, "logprobs": 0}).json()["choices"]
    assert [c["text"] for c in both] == ["Once upon a time", "The cat"]
    for c, text in zip(both, ["Once upon a time", "The cat"]):
        ids = TOK.encode(text, bos=True)
        full = reference(ids)
        np.testing.assert_allclose(c["logprobs"]["token_logprobs"][1:],
                                   [full[j - 1, ids[j]] for j in range(1, len(ids))], atol=1e-4)
        assert all(len(top) == 1 for top in c["logprobs"]["top_logprobs"][1:])


def test_generated_logprobs_are_the_full_forwards_and_stream_alike(server, client, reference):
    prompt = TOK.encode("The weather today", bos=True)
    ids, expected = greedy_reference(reference, prompt, 10)
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 10, "temperature": 0, "logprobs": 3, **LONG}
    choice = post(server, "/v1/completions", body).json()["choices"][0]
    lp = choice["logprobs"]
    np.testing.assert_allclose(lp["token_logprobs"], expected, atol=1e-4)
    texts = TextStream(TOK.decode, context=prompt[-8:])
    assert lp["tokens"] == [texts.add(i) for i in ids] and "".join(lp["tokens"]) == choice["text"]
    assert lp["text_offset"] == [sum(map(len, lp["tokens"][:k])) for k in range(10)]
    assert all(max(top.values()) == t for top, t in zip(lp["top_logprobs"], lp["token_logprobs"]))  # greedy
    # echo with new tokens: the prompt's logprobs, then the new ones, offsets into the whole text
    echoed = post(server, "/v1/completions", {**body, "echo": True}).json()["choices"][0]
    assert echoed["text"] == TOK.decode(prompt) + choice["text"]
    assert echoed["logprobs"]["token_logprobs"][len(prompt):] == lp["token_logprobs"]
    assert echoed["logprobs"]["text_offset"][len(prompt):] == [len(TOK.decode(prompt)) + o for o in lp["text_offset"]]
    # streamed: each chunk carries its tokens' logprobs; together they are the non-streamed ones
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "echo": True, "stream": True},
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    parts = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["logprobs"]]
    assert len(parts) > 2
    assert {k: sum((p[k] for p in parts), []) for k in parts[0]} == echoed["logprobs"]
    assert "".join(c["choices"][0]["text"] for c in chunks) == echoed["text"]
    # chat: logprobs.content, streamed and not
    messages = [{"role": "user", "content": "Say something"}]
    chat_prompt = get_chat_template("llama2-chat").prompt(TOK, messages)
    chat_ids, chat_expected = greedy_reference(reference, chat_prompt, 6)
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                           logprobs=True, top_logprobs=2, extra_body=LONG)
    content = reply.choices[0].logprobs.content
    np.testing.assert_allclose([c.logprob for c in content], chat_expected, atol=1e-4)
    texts = TextStream(TOK.decode)
    assert [c.token for c in content] == [texts.add(i) for i in chat_ids]
    assert all(c.bytes == list(c.token.encode()) and len(c.top_logprobs) == 2 for c in content)
    assert all(c.top_logprobs[0].logprob == c.logprob for c in content)  # greedy: the best is the token
    streamed = [e for chunk in client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2, stream=True,
        extra_body=LONG) for choice in chunk.choices if choice.logprobs for e in choice.logprobs.content]
    assert [e.model_dump() for e in streamed] == [c.model_dump() for c in content]


def test_logprobs_of_concurrent_requests_equal_each_alone(server):
    def ask(k):
        if k % 3 == 0:  # lm-eval's loglikelihood request: score two prompts (+1 token) in one request
            body = {"prompt": [TOK.encode(f"{k} apples and", bos=True), TOK.encode(f"{k} pears", bos=True)],
                    "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0}
        elif k % 3 == 1:
            body = {"prompt": f"Story {k}:" + " go" * (k % 4), "max_tokens": 4 + k, "logprobs": 2, "temperature": 0,
                    **LONG}
        else:
            body = {"prompt": f"Seeded {k}", "max_tokens": 8, "logprobs": 1, "temperature": 0.9, "seed": k, **LONG}
        reply = post(server, "/v1/completions", {"model": "tiny", **body}).json()
        return [(c["text"], c["logprobs"]) for c in reply["choices"]]

    alone = [ask(k) for k in range(12)]
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        assert list(pool.map(ask, range(12))) == alone


def test_bad_logprobs_requests_get_400_naming_the_field(server, client):
    for value in (21, -1):
        reply = post(server, "/v1/completions", {"model": "tiny", "prompt": "hi", "logprobs": value})
        assert reply.status_code == 400 and reply.json()["error"]["param"] == "logprobs"
        assert "logprobs" in reply.json()["error"]["message"]
    chat = dict(model="tiny", messages=[{"role": "user", "content": "hi"}])
    for request, message in [(dict(chat, logprobs=True, top_logprobs=21), "top_logprobs"),
                             (dict(chat, top_logprobs=2), "'top_logprobs' needs 'logprobs'")]:
        with pytest.raises(openai.BadRequestError, match=message) as err:
            client.chat.completions.create(**request)
        assert err.value.body["param"] == "top_logprobs"
    with pytest.raises(openai.BadRequestError, match="only allowed with echo") as err:
        client.completions.create(model="tiny", prompt="hi", max_tokens=0)


def test_lm_eval_harness_scores_through_the_server(server, reference, tmp_path, monkeypatch):
    """The real harness (local-completions, prompts sent as token ids, two per request) on a local
    multiple-choice task: its log-likelihoods are the full forward's, its accuracy the one computed from
    them; and a generate_until task through local-chat-completions."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    from harness_tasks import hf_tokenizer, write_generate_task, write_multiple_choice_task

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    items = [{"question": "The capital of France is", "choices": ["Paris", "London", "a fish"], "answer": 0},
             {"question": "Two plus two equals", "choices": ["four", "five"], "answer": 0},
             {"question": "Once upon a", "choices": ["time", "table", "mountain top"], "answer": 0},
             {"question": "The sky is", "choices": ["green", "blue"], "answer": 1}]
    tasks = write_multiple_choice_task(tmp_path / "tasks", "jaxllm_tiny_mc", items)
    write_generate_task(tasks, "jaxllm_tiny_gen", [{"question": "Say hi:", "answer": "hi"},
                                                  {"question": "Count: one two", "answer": "three"}])
    tokenizer = hf_tokenizer(tmp_path / "tokenizer", DATA / "llama2-32k.model")
    manager = TaskManager(include_path=str(tasks))
    out = lm_eval.simple_evaluate(
        model="local-completions", tasks=["jaxllm_tiny_mc"], task_manager=manager, log_samples=True,
        model_args=f"base_url={server.url}/v1/completions,model=tiny,tokenizer={tokenizer},"
                   f"tokenizer_backend=huggingface,batch_size=2,max_retries=1", cache_requests=False)
    hf = AutoTokenizer.from_pretrained(tokenizer)
    encode = lambda text: hf.encode(text, add_special_tokens=False)
    correct = []
    samples = sorted(out["samples"]["jaxllm_tiny_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == len(items)
    for sample, item in zip(samples, items):
        scores = []
        for (context, continuation), (ll, greedy) in zip(sample["arguments"], (r[0] for r in sample["resps"])):
            whole, ctx = encode(context + continuation), encode(context)  # lm-eval's _encode_pair
            full = reference(whole)
            expected = [full[j - 1, whole[j]] for j in range(len(ctx), len(whole))]
            assert abs(ll - sum(expected)) < 1e-4
            assert greedy == all(full[j - 1].argmax() == whole[j] for j in range(len(ctx), len(whole)))
            scores.append(sum(expected))
        correct.append(float(np.argmax(scores) == item["answer"]))
    assert out["results"]["jaxllm_tiny_mc"]["acc,none"] == pytest.approx(np.mean(correct))
    gen = lm_eval.simple_evaluate(
        model="local-chat-completions", tasks=["jaxllm_tiny_gen"], task_manager=manager, log_samples=True,
        apply_chat_template=True, model_args=f"base_url={server.url}/v1/chat/completions,model=tiny,max_retries=1",
        cache_requests=False)
    answers = [s["resps"][0][0] for s in sorted(gen["samples"]["jaxllm_tiny_gen"], key=lambda s: s["doc_id"])]
    for question, answer in zip(["Say hi:", "Count: one two"], answers):
        reply = post(server, "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": question}],
                                                      "max_tokens": 8, "temperature": 0, "stop": ["\n"]}).json()
        assert answer == reply["choices"][0]["message"]["content"]
    assert gen["results"]["jaxllm_tiny_gen"]["exact_match,none"] == 0.0  # a random model


@pytest.mark.slow
def test_load_64_clients_with_mixed_requests(server):
    """64 clients send 256 requests to a server that takes 16 at a time (the rest get 503 with Retry-After,
    and the official client retries): greedy and seeded, streamed and not, some abandoned midway. Every
    completed request equals its answer alone, and no slot is left held."""
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=50, timeout=600)
    kinds = [dict(temperature=0), dict(temperature=0.9, top_p=0.9, seed=5)]
    prompts = [f"Story {k}: once" for k in range(8)]

    def ask(k, stream=False, abandon=False):
        request = dict(model="tiny", prompt=prompts[k % 8], max_tokens=8 + 5 * (k % 7), **kinds[k % 2])
        if not stream:
            return client.completions.create(**request).choices[0].text
        chunks = client.completions.create(**request, stream=True)
        text = ""
        for i, chunk in enumerate(chunks):
            if abandon and i == 2:
                chunks.close()
                return None
            text += chunk.choices[0].text if chunk.choices else ""
        return text

    alone = {k: ask(k) for k in range(56)}  # each (prompt, length, kind) combination: k mod 56
    jobs = [(k % 56, k % 3 == 1, k % 3 == 1 and k % 11 == 0) for k in range(256)]
    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        results = list(pool.map(lambda job: ask(*job), jobs))
    for (k, _, abandoned), text in zip(jobs, results):
        assert text is None if abandoned else text == alone[k]
    state = wait_idle(server, within=30)
    assert state["ended"].get("cancelled", 0) >= 1 and "error" not in state["ended"]


def test_sigterm_finishes_the_requests_in_flight(server, client):
    stream = client.completions.create(model="tiny", prompt="Long ago", max_tokens=60, temperature=0, stream=True,
                                       stream_options={"include_usage": True}, extra_body=LONG)
    chunks = iter(stream)
    first = next(chunks)
    server.send_signal(signal.SIGTERM)
    rest = list(chunks)
    assert first.choices[0].text is not None and rest[-1].usage.completion_tokens == 60
    assert [c.choices[0].finish_reason for c in rest if c.choices and c.choices[0].finish_reason] == ["length"]
    assert server.wait(60) == 0
    deadline = time.monotonic() + 10  # the reader thread takes the last lines
    while not any("jaxllm serve: stopped" in line for line in server.lines) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert any("jaxllm serve: stopped" in line for line in server.lines)
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/health", timeout=5)
