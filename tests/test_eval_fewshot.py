"""`jaxllm eval choice` by each benchmark's own protocol: the released layouts, the exact prompt text the
reference code builds, the averages each benchmark reports, and one-line errors for bad input."""
import json

import numpy as np
import pytest

from evalfiles import (CEVAL_DEV, CEVAL_SUBJECT, CEVAL_VAL, write_agieval, write_ceval, write_cmmlu, write_gaokao,
                       write_mmlu, write_tiny_checkpoint)
from jaxllm.cli import main as cli
from jaxllm.eval import fewshot
from jaxllm.eval.benchmarks import BENCHMARKS, BenchmarkError, detect
from jaxllm.eval.scoring import continuation_logprobs, loglikelihoods, next_token_scores
from jaxllm.models import forward
from jaxllm.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory, config, params = write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")
    return directory, config, params, Tokenizer.load(directory / "tokenizer.model")


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("benchmarks")
    return {name: write(base / name) for name, write in [("ceval", write_ceval), ("mmlu", write_mmlu),
                                                          ("cmmlu", write_cmmlu), ("agieval", write_agieval),
                                                          ("gaokao", write_gaokao)]}


def first_prompt(root, shots, subject=None):
    benchmark, where = detect(root)
    split = benchmark.load(where, benchmark.default_split)
    built, _ = fewshot.prompts(benchmark, split, fewshot.exemplars(benchmark, where, split, shots))
    item, text = next((i, t) for i, t in built if subject in (None, i.subject))
    return benchmark, item, text


def test_layouts_are_detected(roots):
    assert {name: detect(root)[0].name for name, root in roots.items()} == {n: n for n in roots}
    assert detect(roots["mmlu"])[1] == roots["mmlu"] / "data"
    assert detect(roots["gaokao"])[1] == roots["gaokao"] / "Data" / "Objective_Questions"


def test_ceval_prompt_is_the_reference_codes(roots):
    # ceval code/evaluator_series/evaluators/llama.py: generate_few_shot_prompt + format_example(include_answer=False)
    benchmark, item, text = first_prompt(roots["ceval"], 2, CEVAL_SUBJECT)
    assert text == ("以下是中国关于计算机网络考试的单项选择题，请选出其中的正确答案。\n\n"
                    "下列哪一层负责路由选择？\nA. 物理层\nB. 数据链路层\nC. 网络层\nD. 传输层\n答案：C\n\n"
                    "HTTP 默认使用哪个端口？\nA. 21\nB. 25\nC. 80\nD. 443\n答案：C\n\n"
                    "TCP 属于哪一层？\nA. 物理层\nB. 传输层\nC. 网络层\nD. 应用层\n答案：")
    assert benchmark.protocol(item.subject).choices(item) == ["A", "B", "C", "D"]


def test_mmlu_prompt_is_the_reference_codes(roots):
    # hendrycks/test evaluate.py: gen_prompt (format_subject puts a space before each word) + format_example
    benchmark, item, text = first_prompt(roots["mmlu"], 1)
    assert text == ("The following are multiple choice questions (with answers) about  abstract algebra.\n\n"
                    "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\nA. 0\nB. 1\nC. 2\nD. 3\nAnswer: B\n\n"
                    "Find the degree of Q(sqrt(2), sqrt(3)) over Q.\nA. 0\nB. 4\nC. 2\nD. 6\nAnswer:")
    assert benchmark.protocol(item.subject).choices(item) == [" A", " B", " C", " D"]


def test_cmmlu_prompt_is_the_reference_codes(roots):
    # CMMLU src/mp_utils.py: gen_prompt (name_en2zh) + format_example, "题目：" ... "答案是："
    _, item, text = first_prompt(roots["cmmlu"], 1)
    assert text == ("以下是关于农学的单项选择题，请直接给出正确答案的选项。\n\n"
                    "题目：在农业生产中被当作极其重要的劳动对象发挥作用，最主要的不可替代的基本生产资料是\n"
                    "A. 农业生产工具\nB. 土地\nC. 劳动力\nD. 资金\n答案是：B\n\n"
                    "题目：下列作物中属于豆科的是\nA. 水稻\nB. 小麦\nC. 大豆\nD. 玉米\n答案是：")


def test_agieval_and_gaokao_prompts_and_skips(roots):
    # AGIEval src/dataset_loader.py convert_zero_shot: English and Chinese multiple choice
    _, _, english = first_prompt(roots["agieval"], 0, "logiqa-en")
    assert english == ("All birds can fly. Penguins are birds. Q: Which follows? Answer Choices: (A)Penguins can fly "
                       "(B)Penguins swim (C)No bird flies (D)None\nA: Among A through D, the answer is")
    benchmark, item, chinese = first_prompt(roots["agieval"], 0, "logiqa-zh")
    assert chinese == ("所有的鸟都会飞。企鹅是鸟。问题：由此可以推出？ 选项：(A)企鹅会飞 (B)企鹅会游泳 (C)鸟都不会飞 "
                       "(D)以上都不对\n答案：从A到D, 我们应选择")
    assert benchmark.protocol("logiqa-en").choices(item) == [" A", " B", " C", " D"]
    split = benchmark.load(detect(roots["agieval"])[1], "test")
    assert split.skipped == {"cloze": 1, "multi-answer": 1}
    assert {s: len(v) for s, v in split.subjects.items()} == {"jec-qa-kd": 1, "logiqa-en": 1, "logiqa-zh": 1}
    benchmark, where = detect(roots["gaokao"])
    split = benchmark.load(where, "test")
    assert split.skipped == {"multi-question": 1, "multi-answer": 1}
    first, five = split.subjects["2010-2022_Math_I_MCQs"]
    assert benchmark.protocol("x").format(first) == "1. 已知 $1+1=(\\quad)$\nA. 1\nB. 2\nC. 3\nD. 4\n答案："
    assert len(first.options) == 4 and len(five.options) == 5


def test_subject_maps_hold_the_released_lists():
    ceval, mmlu, cmmlu = (BENCHMARKS[n].metadata() for n in ("ceval", "mmlu", "cmmlu"))
    assert len(ceval["subjects"]) == 52 and len(ceval["hard"]) == 8
    assert {c for s in ceval["subjects"].values() for c in s["categories"]} == {"STEM", "Social Science",
                                                                                 "Humanities", "Other"}
    assert ceval["subjects"]["computer_network"]["name"] == "计算机网络"
    assert len(mmlu["subjects"]) == 57 and len(mmlu["categories"]) == 4
    assert len(cmmlu["subjects"]) == 67 and "China specific" in cmmlu["categories"]


def test_loglikelihoods_equal_the_one_question_scorer(tiny):
    _, config, params, tok = tiny
    prompts = ["TCP 属于哪一层？\nA. 物理层\n答案：", "Find the degree.\nAnswer:"]
    continuations = ["A", " B", "C", "传输层。", " four"]  # one token (one forward per prompt) and several
    requests = [(p, c) for p in prompts for c in continuations]
    batched = loglikelihoods(config, params, tok, requests, batch_size=4)
    single = [s for p in prompts for s in continuation_logprobs(config, params, tok, p, continuations)]
    np.testing.assert_allclose([s for s, _ in batched], single, atol=1e-5)
    context = tok.encode(prompts[0], bos=True)
    logits = np.asarray(forward(config, params, np.asarray([context]))[0, -1], np.float64)
    [(logp, best)] = next_token_scores(config, params, [context], [[319, 350]])
    assert best == int(np.argmax(logits))
    np.testing.assert_allclose(logp, (logits - np.logaddexp.reduce(logits))[[319, 350]], atol=1e-5)


def test_ceval_five_categories_and_hard_average(tiny, roots, tmp_path, capsys):
    directory, config, params, tok = tiny
    out = tmp_path / "ceval.json"
    assert cli(["eval", "choice", "--checkpoint", str(directory), str(roots["ceval"]), "--shots", "2",
                "--mesh", "none", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ceval val, 2-shot" in printed and "Average (Hard)" in printed and "STEM" in printed
    result = json.loads(out.read_text())
    subjects = result["subjects"]
    assert set(subjects) == {"computer_network", "advanced_mathematics"} and result["average"]["questions"] == 5
    mean = np.mean([subjects["computer_network"]["accuracy"], subjects["advanced_mathematics"]["accuracy"]])
    assert result["average"]["accuracy"] == pytest.approx(mean)  # C-Eval: the mean over subjects
    assert result["categories"]["STEM"]["accuracy"] == pytest.approx(mean)
    assert result["average_hard"]["accuracy"] == subjects["advanced_mathematics"]["accuracy"]
    # each item's prediction is its best letter, scored after the prompt the reference code builds
    benchmark, item, text = first_prompt(roots["ceval"], 2, CEVAL_SUBJECT)
    row = next(r for r in result["items"] if r["where"] == item.where)
    np.testing.assert_allclose(row["scores"], continuation_logprobs(config, params, tok, text, list("ABCD")),
                               atol=1e-5)
    assert row["prediction"] == "ABCD"[int(np.argmax(row["scores"]))]


def test_mmlu_averages_over_questions(tiny, roots, capsys):
    directory = tiny[0]
    assert cli(["eval", "choice", "--checkpoint", str(directory), str(roots["mmlu"]), "--benchmark", "mmlu",
                "--shots", "1", "--mesh", "none", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["average"]["questions"] == 2 and "items" not in result
    assert list(result["categories"]) == ["STEM"]


def test_bad_input_one_line_each(tiny, roots, tmp_path, capsys):
    directory = str(tiny[0])

    def error(*argv):
        assert cli(["eval", "choice", "--checkpoint", directory, *argv, "--mesh", "none"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        return err

    bad = write_ceval(tmp_path / "columns")
    val = bad / "val" / f"{CEVAL_SUBJECT}_val.csv"
    val.write_text("id,question,A,B,C,answer\n0,q,1,2,3,A\n", encoding="utf-8")
    assert f"{val}: expected the columns id,question,A,B,C,D,answer (C-Eval), got id,question,A,B,C,answer" in \
        error(str(bad))
    bad = write_ceval(tmp_path / "letter", val=CEVAL_VAL[:1] + [["1", "q", "1", "2", "3", "4", "E"]])
    val = bad / "val" / f"{CEVAL_SUBJECT}_val.csv"
    assert f"{val}:3: answer 'E' is not one of the options A,B,C,D" in error(str(bad))
    dev = roots["ceval"] / "dev" / "advanced_mathematics_dev.csv"
    assert f"{dev}: --shots 9 but the dev split has {len(CEVAL_DEV)} questions" in \
        error(str(roots["ceval"]), "--shots", "9")
    assert "agieval has no dev split" in error(str(roots["agieval"]), "--shots", "1")
    short = tmp_path / "x_test.csv"
    short.write_text("q,1,2,3,A\n", encoding="utf-8")
    with pytest.raises(BenchmarkError, match=f"{short}:1: expected the 6 columns question,A,B,C,D,answer"):
        BENCHMARKS["mmlu"].read(short, "x", {})
    cmmlu = tmp_path / "cmmlu"
    write_cmmlu(cmmlu)
    (cmmlu / "test" / "agronomy.csv").write_text(",question,A,B,C,D,answer\n0,q,1,2,3,4,A\n", encoding="utf-8")
    assert "expected the columns Question,A,B,C,D,Answer (CMMLU)" in error(str(cmmlu))
