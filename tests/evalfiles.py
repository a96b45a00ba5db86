"""Tiny benchmark directories in each benchmark's released layout, and an lm-eval task (YAML + local jsonl)
whose prompt is `jaxllm eval choice`'s C-Eval prompt, for the eval tests and anyone testing lm-eval against
jaxllm (e.g. `local-completions` against `jaxllm serve`)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

CEVAL_SUBJECT = "computer_network"  # 计算机网络, STEM
CEVAL_DEV = [["0", "下列哪一层负责路由选择？", "物理层", "数据链路层", "网络层", "传输层", "C", "路由选择在网络层。"],
             ["1", "HTTP 默认使用哪个端口？", "21", "25", "80", "443", "C", ""]]
CEVAL_VAL = [["0", "TCP 属于哪一层？", "物理层", "传输层", "网络层", "应用层", "B"],
             ["1", "IPv4 地址有多少位？", "16", "32", "64", "128", "B"],
             ["2", "以太网使用哪种介质访问控制方法？", "令牌环", "CSMA/CD", "ALOHA", "轮询", "B"]]
CEVAL_HARD_VAL = [["0", "$\\int_0^1 x\\,dx$ 等于", "0", "1/2", "1", "2", "B"],
                  ["1", "$e^{i\\pi}+1$ 等于", "0", "1", "-1", "i", "A"]]
MMLU_SUBJECT = "abstract_algebra"
MMLU_DEV = [["Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.", "0", "1", "2", "3", "B"]]
MMLU_TEST = [["Find the degree of Q(sqrt(2), sqrt(3)) over Q.", "0", "4", "2", "6", "B"],
             ["Which, of these, is prime?", "4", "6", "7", "9", "C"]]
CMMLU_SUBJECT = "agronomy"
CMMLU_DEV = [["在农业生产中被当作极其重要的劳动对象发挥作用，最主要的不可替代的基本生产资料是", "农业生产工具", "土地", "劳动力", "资金", "B"]]
CMMLU_TEST = [["下列作物中属于豆科的是", "水稻", "小麦", "大豆", "玉米", "C"],
              ["光合作用主要在植物的哪个部位进行？", "根", "叶", "茎", "花", "B"]]
AGIEVAL = {
    "logiqa-en": [{"passage": "All birds can fly. Penguins are birds. ", "question": "Which follows?",
                   "options": ["(A)Penguins can fly", "(B)Penguins swim", "(C)No bird flies", "(D)None"],
                   "label": "A", "answer": None, "other": None}],
    "logiqa-zh": [{"passage": "所有的鸟都会飞。企鹅是鸟。", "question": "由此可以推出？",
                   "options": ["(A)企鹅会飞", "(B)企鹅会游泳", "(C)鸟都不会飞", "(D)以上都不对"],
                   "label": "A", "answer": None, "other": None}],
    "jec-qa-kd": [{"passage": None, "question": "下列哪些说法正确？", "options": ["(A)甲", "(B)乙", "(C)丙", "(D)丁"],
                   "label": ["A", "C"], "answer": None, "other": None},
                  {"passage": None, "question": "下列哪项说法正确？", "options": ["(A)甲", "(B)乙", "(C)丙", "(D)丁"],
                   "label": ["B"], "answer": None, "other": None}],
    "gaokao-mathcloze": [{"passage": None, "question": "已知 $2x=4$，则 $x=$", "options": None, "label": None,
                          "answer": "2", "other": {"source": "tiny"}}],
}
GAOKAO = {
    "2010-2022_Math_I_MCQs": [
        {"year": "2010", "category": "（新课标）", "question": "1. 已知 $1+1=(\\quad)$\nA. 1\nB. 2\nC. 3\nD. 4\n",
         "answer": ["B"], "analysis": "", "index": 0, "score": 5},
        {"year": "2011", "category": "（新课标）", "question": "2. 下列数中最大的是\nA. 1\nB. 5\nC. 3\nD. 4\nE. 2\n",
         "answer": ["B"], "analysis": "", "index": 1, "score": 5}],
    "2010-2022_English_Reading_Comp": [
        {"year": "2010", "category": "（新课标Ⅰ）", "question": "A passage.\n21. Why?\nA. a\nB. b\nC. c\nD. d\n"
         "22. What?\nA. a\nB. b\nC. c\nD. d\n", "answer": ["A", "C"], "analysis": "", "index": 0, "score": 4}],
    "2010-2022_Physics_MCQs": [
        {"year": "2012", "category": "（全国卷）", "question": "14. 下列说法正确的是\nA. 甲\nB. 乙\nC. 丙\nD. 丁\n",
         "answer": ["BD"], "analysis": "", "index": 0, "score": 6}],
}


def _csv(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


def write_ceval(root: Path, dev=CEVAL_DEV, val=CEVAL_VAL) -> Path:
    """C-Eval as released (ceval-exam.zip): dev/ (with explanations), val/, one CSV per subject, plus a
    hard subject (advanced_mathematics, which shares its dev exemplars here)."""
    header = ["id", "question", "A", "B", "C", "D", "answer"]
    _csv(root / "dev" / f"{CEVAL_SUBJECT}_dev.csv", [header + ["explanation"], *dev])
    _csv(root / "val" / f"{CEVAL_SUBJECT}_val.csv", [header, *val])
    _csv(root / "dev" / "advanced_mathematics_dev.csv", [header + ["explanation"], *dev])
    _csv(root / "val" / "advanced_mathematics_val.csv", [header, *CEVAL_HARD_VAL])
    return root


def write_mmlu(root: Path) -> Path:
    """MMLU as released (data.tar): data/dev/{s}_dev.csv and data/test/{s}_test.csv, no header."""
    _csv(root / "data" / "dev" / f"{MMLU_SUBJECT}_dev.csv", MMLU_DEV)
    _csv(root / "data" / "test" / f"{MMLU_SUBJECT}_test.csv", MMLU_TEST)
    return root


def write_cmmlu(root: Path) -> Path:
    """CMMLU as released: dev/{s}.csv and test/{s}.csv with an index column and `,Question,A,B,C,D,Answer`."""
    header = ["", "Question", "A", "B", "C", "D", "Answer"]
    _csv(root / "dev" / f"{CMMLU_SUBJECT}.csv", [header, *[[str(i), *r] for i, r in enumerate(CMMLU_DEV)]])
    _csv(root / "test" / f"{CMMLU_SUBJECT}.csv", [header, *[[str(i), *r] for i, r in enumerate(CMMLU_TEST)]])
    return root


def write_agieval(root: Path) -> Path:
    """AGIEval as released: data/v1/{task}.jsonl."""
    (root / "data" / "v1").mkdir(parents=True, exist_ok=True)
    for task, rows in AGIEVAL.items():
        (root / "data" / "v1" / f"{task}.jsonl").write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return root


def write_gaokao(root: Path) -> Path:
    """GAOKAO-Bench as released: Data/Objective_Questions/{keywords}.json."""
    folder = root / "Data" / "Objective_Questions"
    folder.mkdir(parents=True, exist_ok=True)
    for keywords, examples in GAOKAO.items():
        (folder / f"{keywords}.json").write_text(json.dumps({"keywords": keywords, "example": examples},
                                                            ensure_ascii=False, indent=4), encoding="utf-8")
    return root


CEVAL_TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {val}
    dev: {dev}
validation_split: validation
fewshot_split: dev
fewshot_config:
  sampler: first_n
output_type: multiple_choice
description: "以下是中国关于{subject_zh}考试的单项选择题，请选出其中的正确答案。\\n\\n"
doc_to_text: "{{{{question}}}}\\nA. {{{{A}}}}\\nB. {{{{B}}}}\\nC. {{{{C}}}}\\nD. {{{{D}}}}\\n答案："
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: "{{{{['A', 'B', 'C', 'D'].index(answer)}}}}"
target_delimiter: ""
fewshot_delimiter: "\\n\\n"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def write_ceval_task(directory: Path, name: str = "jaxllm_ceval_tiny", dev=CEVAL_DEV, val=CEVAL_VAL,
                     subject_zh: str = "计算机网络") -> Path:
    """An lm-eval task over the C-Eval rows `val` with exemplars from `dev` (first n, in order), written the
    way `jaxllm eval choice --benchmark ceval` prompts: the header as the description, each exemplar
    `question\\nA. …\\n答案：X\\n\\n`, then the question ending in `答案：`; the choices are the bare letters.
    Returns `directory` (pass it as --include-path)."""
    directory.mkdir(parents=True, exist_ok=True)

    def jsonl(path: Path, rows) -> Path:
        keys = ["id", "question", "A", "B", "C", "D", "answer"]
        path.write_text("".join(json.dumps(dict(zip(keys, r[:7])), ensure_ascii=False) + "\n" for r in rows),
                        encoding="utf-8")
        return path

    dev_file = jsonl(directory / f"{name}_dev.jsonl", dev)
    val_file = jsonl(directory / f"{name}_val.jsonl", val)
    (directory / f"{name}.yaml").write_text(CEVAL_TASK.format(name=name, val=val_file, dev=dev_file,
                                                              subject_zh=subject_zh), encoding="utf-8")
    return directory


def write_tiny_checkpoint(directory: Path):
    """A randomly initialised llama2-tiny with the real Llama 2 tokenizer (32k pieces, 256 positions), as the
    inference tests use; returns (directory, config, params)."""
    import shutil

    import jax
    import numpy as np

    from jaxllm.checkpoint import save_params
    from jaxllm.models import get_preset, init_params

    config = get_preset("llama2-tiny", vocab_size=32000, max_position_embeddings=256)
    params = init_params(config, jax.random.key(0))
    save_params(directory, jax.tree.map(np.asarray, params), config)
    shutil.copy(Path(__file__).parent / "data" / "llama2-32k.model", directory / "tokenizer.model")
    return directory, config, params
