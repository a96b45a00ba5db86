"""The benchmarks' own protocols as data: where each keeps its splits, how its reference code writes a
prompt, which continuation is scored, and how it averages.

- ceval: `dev/{s}_dev.csv`, `val/{s}_val.csv`, `test/{s}_test.csv`, header `id,question,A,B,C,D,answer`
  (+`explanation` in dev); hkust-nlp/ceval `code/evaluator_series/evaluators/llama.py`
- mmlu: `data/dev/{s}_dev.csv`, `data/val/{s}_val.csv`, `data/test/{s}_test.csv`, no header:
  `question,A,B,C,D,answer`; hendrycks/test `evaluate.py`
- cmmlu: `dev/{s}.csv`, `test/{s}.csv`, header `,Question,A,B,C,D,Answer`; haonan-li/CMMLU `src/mp_utils.py`
- agieval: `data/v1/{s}.jsonl` with `passage, question, options ["(A)…"], label`; ruixiangcui/AGIEval
  `src/dataset_loader.py` (`convert_zero_shot`)
- gaokao: `Data/Objective_Questions/{s}.json`, `{"keywords", "example": [{"question", "answer": [...]}]}`

Every protocol scores the letter after the prompt by log-likelihood, as MMLU's and CMMLU's code do. C-Eval's
header names the subject in Chinese (`subject_mapping.json`'s second column, as its tutorial asks).
AGIEval's cloze tasks and multi-answer items, and GAOKAO-Bench's multi-answer and multi-question items, are
skipped and counted; neither ships a dev split, so both run zero-shot. GAOKAO-Bench's own protocol is
generative (chain of thought, answer after 【答案】); here an item is `{question}\\n答案：` and its letter."""
from __future__ import annotations

import csv
import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "eval" / "benchmarks"
LETTERS = "ABCDEFG"
# AGIEval's English tasks (dataset_loader.py's english_qa_datasets); its other tasks take the Chinese prompt.
AGIEVAL_ENGLISH = frozenset({"lsat-ar", "lsat-lr", "lsat-rc", "logiqa-en", "sat-math", "sat-en", "aqua-rat",
                             "sat-en-without-passage", "gaokao-english", "math"})


@dataclass(frozen=True)
class Item:
    """One question: `options` in letter order, `answer` one of their letters; `where` is `file:line`."""
    subject: str
    question: str
    options: tuple[str, ...]
    answer: str
    passage: str = ""
    where: str = ""


@dataclass(frozen=True)
class Protocol:
    """How one benchmark writes a prompt: `header` ({subject}: the subject's display name), then each
    exemplar as `item` + `shot_answer`, then the question as `item`; `item` has the fields {passage},
    {question}, {options} (each option as `option`, joined by `option_separator`) and {last} (the last
    letter). `choice` is the continuation scored for each letter. `weighting`: averages over subjects
    ("subjects": every subject counts once, as C-Eval and CMMLU report) or over questions (MMLU)."""
    header: str
    item: str
    shot_answer: str
    choice: str
    option: str = "\n{letter}. {text}"
    option_separator: str = ""
    weighting: str = "subjects"

    def format(self, item: Item, with_answer: bool = False) -> str:
        letters = LETTERS[:len(item.options)]
        options = self.option_separator.join(self.option.format(letter=letter, text=text)
                                             for letter, text in zip(letters, item.options))
        text = self.item.format(passage=item.passage, question=item.question, options=options, last=letters[-1])
        return text + self.shot_answer.format(answer=item.answer) if with_answer else text

    def prompt(self, item: Item, shots=(), subject_name: str = "") -> str:
        return (self.header.format(subject=subject_name) + "".join(self.format(s, True) for s in shots)
                + self.format(item))

    def choices(self, item: Item) -> list[str]:
        return [self.choice.format(letter=letter) for letter in LETTERS[:len(item.options)]]


CEVAL = Protocol(header="以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n",
                 item="{question}{options}\n答案：", shot_answer="{answer}\n\n", choice="{letter}")
MMLU = Protocol(header="The following are multiple choice questions (with answers) about {subject}.\n\n",
                item="{question}{options}\nAnswer:", shot_answer=" {answer}\n\n", choice=" {letter}",
                weighting="questions")
CMMLU = Protocol(header="以下是关于{subject}的单项选择题，请直接给出正确答案的选项。\n\n",
                 item="题目：{question}{options}\n答案是：", shot_answer="{answer}\n\n", choice="{letter}")
AGIEVAL_EN = Protocol(header="", item="{passage}Q: {question} Answer Choices: {options}\n"
                      "A: Among A through {last}, the answer is", shot_answer=" {answer}\n\n", choice=" {letter}",
                      option="{text}", option_separator=" ")
AGIEVAL_ZH = Protocol(header="", item="{passage}问题：{question} 选项：{options}\n答案：从A到{last}, 我们应选择",
                      shot_answer="{answer}\n\n", choice="{letter}", option="{text}", option_separator=" ")
GAOKAO = Protocol(header="", item="{question}\n答案：", shot_answer="{answer}\n\n", choice="{letter}", option="",
                  weighting="questions")


class BenchmarkError(ValueError):
    """A benchmark directory or file that is not in the benchmark's released layout."""


@dataclass
class Split:
    """The questions of one split, by subject, and what was skipped (reason → count)."""
    subjects: dict[str, list[Item]]
    files: dict[str, Path]
    skipped: dict[str, int] = field(default_factory=dict)


def _rows(path: Path):
    """(line number where the record starts, row) of a CSV file; multi-line quoted fields count once."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        start = 1
        for row in reader:
            if row:
                yield start, row
            start = reader.line_num + 1


def _item(path: Path, number: int, subject: str, question: str, options, answer: str, passage: str = "") -> Item:
    answer = str(answer).strip().upper()
    letters = LETTERS[:len(options)]
    if answer not in letters or len(answer) != 1:
        raise BenchmarkError(f"{path}:{number}: answer {answer!r} is not one of the options {','.join(letters)}")
    return Item(subject, question, tuple(options), answer, passage, f"{path}:{number}")


def _headed_csv(path: Path, subject: str, columns: tuple[str, ...], question: str, answer: str,
                benchmark: str) -> list[Item]:
    rows = list(_rows(path))
    header = [c.strip() for c in rows[0][1]] if rows else []
    if not rows or not set(columns) <= set(header):
        raise BenchmarkError(f"{path}: expected the columns {','.join(columns)} ({benchmark}), got "
                             f"{','.join(header) or 'an empty file'}")
    at = {name: header.index(name) for name in columns}
    items = []
    for number, row in rows[1:]:
        if len(row) < len(header):
            raise BenchmarkError(f"{path}:{number}: {len(row)} columns, the header has {len(header)}")
        items.append(_item(path, number, subject, row[at[question]], [row[at[k]] for k in "ABCD"], row[at[answer]]))
    return items


def read_ceval(path: Path, subject: str, skipped: dict[str, int] | None = None) -> list[Item]:
    return _headed_csv(path, subject, ("id", "question", "A", "B", "C", "D", "answer"), "question", "answer",
                       "C-Eval")


def read_cmmlu(path: Path, subject: str, skipped: dict[str, int] | None = None) -> list[Item]:
    return _headed_csv(path, subject, ("Question", "A", "B", "C", "D", "Answer"), "Question", "Answer", "CMMLU")


def read_mmlu(path: Path, subject: str, skipped: dict[str, int] | None = None) -> list[Item]:
    items = []
    for number, row in _rows(path):
        if len(row) != 6:
            raise BenchmarkError(f"{path}:{number}: expected the 6 columns question,A,B,C,D,answer (MMLU, no "
                                 f"header), got {len(row)}")
        items.append(_item(path, number, subject, row[0], row[1:5], row[5]))
    return items


def read_agieval(path: Path, subject: str, skipped: dict[str, int]) -> list[Item]:
    items = []
    for number, line in enumerate(path.read_text("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise BenchmarkError(f"{path}:{number}: bad JSON: {err.msg}") from None
        if not isinstance(record, dict) or "question" not in record:
            raise BenchmarkError(f"{path}:{number}: expected the fields passage, question, options, label (AGIEval)")
        label = record.get("label")
        if not record.get("options"):
            skipped["cloze"] = skipped.get("cloze", 0) + 1
            continue
        if isinstance(label, list):
            label = label[0] if len(label) == 1 else None
        if label is None or len(str(label).strip()) != 1:
            skipped["multi-answer"] = skipped.get("multi-answer", 0) + 1
            continue
        items.append(_item(path, number, subject, record["question"], record["options"], label,
                           record.get("passage") or ""))
    return items


_OPTION = re.compile(r"(?:^|\s)([A-G])\s*[.．、:：]")


def read_gaokao(path: Path, subject: str, skipped: dict[str, int]) -> list[Item]:
    try:
        data = json.loads(path.read_text("utf-8"))
        examples = data["example"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise BenchmarkError(f"{path}: expected {{\"keywords\": ..., \"example\": [...]}} (GAOKAO-Bench)") from None
    items = []
    for number, example in enumerate(examples):
        answer = example.get("answer") if isinstance(example, dict) else None
        if not isinstance(answer, list) or "question" not in example:
            raise BenchmarkError(f"{path}: example {number}: expected the fields question and answer (a list)")
        if len(answer) != 1:
            skipped["multi-question"] = skipped.get("multi-question", 0) + 1
            continue
        if len(str(answer[0]).strip()) != 1:
            skipped["multi-answer"] = skipped.get("multi-answer", 0) + 1
            continue
        found = _OPTION.findall(example["question"])
        count = max(4, LETTERS.index(max(found)) + 1 if found else 0)
        # the options are part of the question text; `options` holds only their letters
        items.append(_item(path, number, subject, example["question"].strip(), [""] * count, answer[0]))
    return items


@dataclass(frozen=True)
class Benchmark:
    """A benchmark's layout: `splits` maps a split to its files ({subject} in the name), `read` reads one
    file, `subjects` is the assets file with display names and categories."""
    name: str
    splits: dict[str, str]
    default_split: str
    read: Callable[[Path, str, dict], list[Item]]
    subjects: str | None = None
    dev: str | None = "dev"

    def protocol(self, subject: str) -> Protocol:
        if self.name == "agieval":
            return AGIEVAL_EN if subject in AGIEVAL_ENGLISH else AGIEVAL_ZH
        return {"ceval": CEVAL, "mmlu": MMLU, "cmmlu": CMMLU, "gaokao": GAOKAO}[self.name]

    def metadata(self) -> dict:
        """{"categories": [...], "subjects": {handle: {"name", "categories", ...}}[, "hard": [...]]}."""
        return _metadata(self.subjects)

    def subject_name(self, subject: str) -> str:
        """The name the header uses: C-Eval's and CMMLU's Chinese name, MMLU's format_subject."""
        entry = self.metadata()["subjects"].get(subject)
        if entry:
            return entry["name"]
        return " " + " ".join(subject.split("_")) if self.name == "mmlu" else subject

    def load(self, root: Path, split: str) -> Split:
        if split not in self.splits:
            raise BenchmarkError(f"{self.name} has the splits {', '.join(self.splits)}, not {split!r}")
        pattern = self.splits[split]
        prefix, suffix = pattern.split("{subject}")
        files = {path.name[:len(path.name) - len(suffix)]: path for path in sorted(root.glob(prefix + "*" + suffix))}
        if not files:
            raise BenchmarkError(f"{root}: no {split} files {pattern.format(subject='*')} ({self.name})")
        skipped: dict[str, int] = {}
        subjects = {}
        for subject, path in files.items():
            subjects[subject] = self.read(path, subject, skipped)
        return Split({s: items for s, items in subjects.items() if items}, files, skipped)


@functools.lru_cache(maxsize=None)
def _metadata(file: str | None) -> dict:
    return json.loads((ASSETS / file).read_text("utf-8")) if file else {"categories": [], "subjects": {}}


BENCHMARKS = {
    "ceval": Benchmark("ceval", {"dev": "dev/{subject}_dev.csv", "val": "val/{subject}_val.csv",
                                 "test": "test/{subject}_test.csv"}, "val", read_ceval, "ceval.json"),
    "mmlu": Benchmark("mmlu", {"dev": "dev/{subject}_dev.csv", "val": "val/{subject}_val.csv",
                               "test": "test/{subject}_test.csv"}, "test", read_mmlu, "mmlu.json"),
    "cmmlu": Benchmark("cmmlu", {"dev": "dev/{subject}.csv", "test": "test/{subject}.csv"}, "test", read_cmmlu,
                       "cmmlu.json"),
    "agieval": Benchmark("agieval", {"test": "{subject}.jsonl"}, "test", read_agieval, dev=None),
    "gaokao": Benchmark("gaokao", {"test": "{subject}.json"}, "test", read_gaokao, dev=None),
}


def detect(root: str | Path) -> tuple[Benchmark, Path]:
    """(benchmark, the directory its split patterns start from) for a released data directory."""
    root = Path(root)
    if not root.is_dir():
        raise BenchmarkError(f"{root}: no such benchmark directory")
    for inner in ("Data/Objective_Questions", "Objective_Questions", "data/v1", "data"):
        if (root / inner).is_dir() and (inner != "data" or (root / inner / "dev").is_dir()):
            return detect(root / inner)
    if any(root.glob("*.jsonl")):
        return BENCHMARKS["agieval"], root
    if any(root.glob("*.json")):
        return BENCHMARKS["gaokao"], root
    dev = sorted((root / "dev").glob("*.csv")) if (root / "dev").is_dir() else []
    if dev and all(p.name.endswith("_dev.csv") for p in dev):
        first = dev[0].read_text("utf-8-sig").split("\n", 1)[0].replace(" ", "").lower()
        return BENCHMARKS["ceval" if first.startswith("id,question,") else "mmlu"], root
    if dev:
        return BENCHMARKS["cmmlu"], root
    raise BenchmarkError(f"{root}: not a C-Eval, MMLU, CMMLU, AGIEval or GAOKAO-Bench layout; pass --benchmark")


def locate(root: str | Path, name: str | None) -> tuple[Benchmark, Path]:
    """The benchmark `name` (or the detected one) and its directory."""
    if name is None:
        return detect(root)
    if name not in BENCHMARKS:
        raise BenchmarkError(f"unknown benchmark {name!r}; one of {', '.join(BENCHMARKS)}")
    root = Path(root)
    if not root.is_dir():
        raise BenchmarkError(f"{root}: no such benchmark directory")
    inner = {"mmlu": "data", "agieval": "data/v1", "gaokao": "Data/Objective_Questions"}.get(name)
    return BENCHMARKS[name], root / inner if inner and (root / inner).is_dir() else root
