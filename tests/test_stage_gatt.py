"""Ghost Attention data (`jaxllm data gatt`): the instruction in the first turn only, the loss on the last
reply only, weight-0 replies for every chat template, and replies sampled from a policy with the
instruction on every user turn."""
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxllm.cli import main as cli
from jaxllm.stages import gatt
from jaxllm.stages.data import DataFormatError, check_conversation, encode_sft, mask_untrained_replies, to_messages
from jaxllm.tokenizer import Tokenizer, get_chat_template

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "jaxllm" / "assets" / "demo" / "tokenizer.model"
INSTRUCTION = "Always answer in capital letters."
USERS = ["Say river.", "Say stone.", "Say cloud."]
REPLIES = ["RIVER.", "STONE.", "CLOUD."]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def trained_text(tok, ids, mask):
    return tok.decode([i for i, m in zip(ids, mask) if m and i != tok.eos_id])


@pytest.mark.parametrize("place", ["user", "system"])
def test_gatt_records_keep_the_instruction_in_turn_one_and_train_on_the_last_reply_only(tmp_path, place):
    tok = Tokenizer.load(TOKENIZER)
    template = get_chat_template("llama2-chat")
    (last,) = gatt.training_records(INSTRUCTION, USERS, REPLIES, place=place)
    every = gatt.training_records(INSTRUCTION, USERS, REPLIES, place=place, targets="every")
    assert last == every[-1] and len(every) == 3
    path = write_jsonl(tmp_path / "gatt.jsonl", every)
    examples, stats = encode_sft([path], tok, template, seq_len=256)
    assert stats.examples == 3 and stats.skipped == 0
    for k, (ids, mask, _) in enumerate(examples):
        text = tok.decode(list(ids))
        assert text.count(INSTRUCTION) == 1 and text.index(INSTRUCTION) < text.index(USERS[0])
        assert trained_text(tok, ids, mask).strip() == REPLIES[k]  # only reply k (and its EOS) is learned
        assert mask[-1] == 1 and ids[-1] == tok.eos_id
        assert all(u in text for u in USERS[:k + 1]) and all(r in text for r in REPLIES[:k + 1])
    # sampling attaches the instruction to every user turn
    sampled = gatt.sampling_messages(INSTRUCTION, USERS, REPLIES[:2])
    assert [m["content"] for m in sampled[0::2]] == [gatt.join(INSTRUCTION, u) for u in USERS]
    assert [m["content"] for m in sampled[1::2]] == REPLIES[:2]


@pytest.mark.parametrize("name,model", [("llama2-chat", "llama2-32k.model"), ("ziya", "llama2-32k.model"),
                                        ("plain", "llama2-32k.model"), ("baichuan2-chat", "baichuan-64k.model")])
def test_weight_zero_replies_are_context_in_every_template(name, model):
    tok = Tokenizer(ROOT / "tests" / "data" / model)
    template = get_chat_template(name)
    messages = [{"role": "system", "content": "Be brief."}]
    for user, reply, weight in zip(USERS, REPLIES, (0, 1, 0)):
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply, "weight": weight}]
    ids, labels, full = template.render_labels(tok, messages)
    mask = mask_untrained_replies(full, messages)
    runs = [i for i, m in enumerate(full) if m]
    kept = [i for i, m in enumerate(mask) if m]
    assert kept and set(kept) < set(runs)
    assert tok.decode([labels[i] for i in kept if labels[i] != tok.eos_id]).strip() == REPLIES[1]


def test_reply_weights_are_checked():
    ok = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 0},
                       {"role": "user", "content": "c"}, {"role": "assistant", "content": "d", "weight": 1}]}
    assert [m.get("weight") for m in to_messages(ok)] == [None, 0, None, 1]
    share = {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b", "weight": 0}]}
    with pytest.raises(DataFormatError, match="every assistant reply has weight 0"):
        check_conversation(to_messages(share))
    with pytest.raises(DataFormatError, match=r"messages\[0\].weight: only assistant replies have a weight"):
        to_messages({"messages": [{"role": "user", "content": "a", "weight": 0}]})
    with pytest.raises(DataFormatError, match=r"messages\[1\].weight must be 0 \(not trained\) or 1, got 0.5"):
        to_messages({"messages": [{"role": "user", "content": "a"},
                                  {"role": "assistant", "content": "b", "weight": 0.5}]})


def test_instructions_are_read_and_combined(tmp_path):
    text = tmp_path / "inst.txt"
    text.write_text("Answer in capitals.\n\nEnd with Amen.\nBe brief.\n")
    assert gatt.read_instructions(text) == ["Answer in capitals.", "End with Amen.", "Be brief."]
    jsonl = write_jsonl(tmp_path / "inst.jsonl", [{"instruction": "Speak French."}, {"text": "x"}])
    with pytest.raises(DataFormatError, match=f"{jsonl}:2: expected"):
        gatt.read_instructions(jsonl)
    rng = np.random.default_rng(0)
    picked = {gatt.choose_instruction(gatt.read_instructions(text), rng, combine=2) for _ in range(50)}
    assert "Answer in capitals." in picked and any(p.count(".") == 2 for p in picked)


def test_gatt_command_without_a_policy(tmp_path, capsys):
    dialogues = write_jsonl(tmp_path / "d.jsonl", [
        {"messages": [{"role": "system", "content": INSTRUCTION}] +
                     [m for u, r in zip(USERS, REPLIES) for m in ({"role": "user", "content": u},
                                                                   {"role": "assistant", "content": r})]},
        {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                           {"from": "gpt", "value": "Hello."}]},
        {"foo": 1}])
    out = tmp_path / "out" / "gatt.jsonl"
    assert cli(["data", "gatt", str(dialogues), "-o", str(out), "--targets", "every"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 4 and records[2] == gatt.training_records(INSTRUCTION, USERS, REPLIES)[0]
    assert "2 dialogues (1 records skipped)" in capsys.readouterr().out
    assert cli(["data", "gatt", str(dialogues), "-o", str(out)]) == 2
    assert f"{out} exists: pass --overwrite" in capsys.readouterr().err
    bare = write_jsonl(tmp_path / "bare.jsonl", [{"instruction": "q", "output": "a"}])
    assert cli(["data", "gatt", str(bare), "-o", str(tmp_path / "x.jsonl")]) == 2
    assert f"{bare}:1: the dialogue has no system message" in capsys.readouterr().err
    assert cli(["data", "gatt", str(bare), "-o", str(tmp_path / "x.jsonl"), "--instructions", "i.txt"]) == 2
    assert "--instructions needs --policy" in capsys.readouterr().err
    assert cli(["data", "gatt", str(bare), "-o", str(tmp_path / "x.jsonl"), "--combine", "0"]) == 2
    assert "--combine must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()


def scripted_policy(tmp_path, tok, reply):
    """A llama2-tiny checkpoint that answers every llama2-chat prompt with `reply` (text, or ids) then EOS,
    greedily: the
    blocks add nothing to the residual stream (zero output projections), so the next token is a function of
    the current one alone, and the head maps the prompt's last token → the reply's first piece → … → EOS."""
    from jaxllm.checkpoint import save_params
    from jaxllm.models import get_preset, init_params

    cfg = get_preset("llama2-tiny", vocab_size=tok.vocab_size)
    params = jax.tree.map(np.array, init_params(cfg, jax.random.key(0)))  # writable copies
    params["layers"]["attn"]["wo"][:] = 0
    params["layers"]["mlp"]["down"][:] = 0
    pieces = tok.encode(" " + reply) if isinstance(reply, str) else list(reply)
    chain = [tok.encode("[INST] x [/INST]")[-1], *pieces, tok.eos_id]
    assert len(set(chain)) == len(chain)
    emb = params["embedding"]
    head = np.zeros_like(params["lm_head"])
    for current, following in zip(chain, chain[1:]):
        head[:, following] += 30 * emb[current] / np.linalg.norm(emb[current])
    params["lm_head"] = head
    save_params(tmp_path / "policy", params, cfg)
    return tmp_path / "policy"


def test_gatt_command_samples_every_turn_from_a_policy(tmp_path, capsys):
    tok = Tokenizer.load(TOKENIZER)
    policy = scripted_policy(tmp_path, tok, "AMEN")
    dialogues = write_jsonl(tmp_path / "d.jsonl", [
        {"messages": [{"role": "user", "content": u} for u in USERS[:1]] +
                     [{"role": "assistant", "content": "ignored"}, {"role": "user", "content": USERS[1]}]},
        {"messages": [{"role": "user", "content": "Hi"}]},
        {"messages": [{"role": "system", "content": "Own."}, {"role": "user", "content": "Yo"}]}])
    instructions = tmp_path / "inst.txt"
    instructions.write_text("End with Amen.\nShout.\n")
    out = tmp_path / "gatt.jsonl"
    assert cli(["data", "gatt", str(dialogues), "--instructions", str(instructions), "--policy", str(policy),
                "--tokenizer", str(TOKENIZER), "--temperature", "0", "--max-new-tokens", "8", "--mesh", "none",
                "-o", str(out)]) == 0, capsys.readouterr().err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [len(r["messages"]) for r in records] == [4, 2, 2]
    assert [m["content"] for r in records for m in r["messages"] if m["role"] == "assistant"] == ["AMEN"] * 4
    first = records[0]
    assert first["messages"][0]["content"] == gatt.join(first["gatt_instruction"], USERS[0])
    assert first["messages"][2]["content"] == USERS[1] and first["messages"][1]["weight"] == 0
    assert first["gatt_instruction"] in ("End with Amen.", "Shout.") and records[2]["gatt_instruction"] == "Own."
    # a reply that does not finish within max_new_tokens ends the dialogue (nothing to train on here)
    (tmp_path / "long").mkdir()
    wordy = scripted_policy(tmp_path / "long", tok, range(1000, 1012))
    assert cli(["data", "gatt", str(dialogues), "--instructions", str(instructions), "--policy", str(wordy),
                "--tokenizer", str(TOKENIZER), "--temperature", "0", "--max-new-tokens", "8", "--mesh", "none",
                "-o", str(tmp_path / "none.jsonl")]) == 2
    assert "ended: reply unfinished: 3" in capsys.readouterr().err


@pytest.mark.slow
def test_gatt_makes_a_first_turn_instruction_hold_at_turns_3_and_4(tmp_path):
    """examples/gatt_demo.py, shortened: with GAtt the instruction holds at turns ≥ 3; without (the base
    model, or the same extra steps on the base data) it does not."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gatt_demo", ROOT / "examples" / "gatt_demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    figures = tmp_path / "figures.json"
    assert demo.main(["--base-steps", "250", "--tune-steps", "80", "--eval", "32", "--work-dir", str(tmp_path),
                      "--json", str(figures)]) == 0
    table = json.loads(figures.read_text())
    with_gatt, base, control = (table[k] for k in ("with GAtt", "without GAtt (base)", "without GAtt (control)"))
    assert base["turns"][0] > 0.5 and with_gatt["turns"][0] > 0.5  # both follow it in the turn that states it
    assert with_gatt["turn>=3"] >= max(base["turn>=3"], control["turn>=3"]) + 0.25
    assert with_gatt["no instruction"] > 0.9  # and the default behaviour is intact
