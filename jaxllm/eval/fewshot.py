"""Few-shot multiple choice the way each benchmark reports it: exemplars from its dev split, its prompt, the
letter with the highest log-likelihood, and its averages (per subject, per category, overall)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxllm.eval.benchmarks import LETTERS, Benchmark, BenchmarkError, Item, Split
from jaxllm.eval.scoring import loglikelihoods


def exemplars(benchmark: Benchmark, root: Path, questions: Split, shots: int) -> dict[str, list[Item]]:
    """The first `shots` dev questions of each subject (both MMLU's and CMMLU's code take them in file order)."""
    if shots < 0:
        raise BenchmarkError(f"--shots must be >= 0, got {shots}")
    if shots == 0:
        return {s: [] for s in questions.subjects}
    if benchmark.dev is None:
        raise BenchmarkError(f"{benchmark.name} has no dev split to draw exemplars from; use --shots 0")
    dev = benchmark.load(root, benchmark.dev)
    out = {}
    for subject in questions.subjects:
        pool = dev.subjects.get(subject, [])
        if shots > len(pool):
            where = dev.files.get(subject, root / benchmark.splits[benchmark.dev].format(subject=subject))
            raise BenchmarkError(f"{where}: --shots {shots} but the dev split has {len(pool)} questions")
        out[subject] = pool[:shots]
    return out


def prompts(benchmark: Benchmark, questions: Split, shots: dict[str, list[Item]], tokenizer=None,
            max_length: int | None = None) -> tuple[list[tuple[Item, str]], int]:
    """[(item, prompt)] and how many prompts dropped exemplars to fit `max_length` tokens (with the answer):
    like MMLU's crop, the last exemplar goes until the prompt fits."""
    out, cropped = [], 0
    for subject, items in questions.subjects.items():
        protocol, name = benchmark.protocol(subject), benchmark.subject_name(subject)
        for item in items:
            k = len(shots[subject])
            text = protocol.prompt(item, shots[subject][:k], name)
            while k and max_length and len(text.encode()) + 2 > max_length and \
                    len(tokenizer.encode(text + "A", bos=tokenizer.add_bos)) > max_length:  # ≤ 1 piece a byte
                k -= 1
                text = protocol.prompt(item, shots[subject][:k], name)
            cropped += k < len(shots[subject])
            out.append((item, text))
    return out, cropped


def average(benchmark: Benchmark, correct: dict[str, list[bool]], names) -> dict | None:
    """Accuracy over the subjects `names` that were run: the mean of their accuracies (C-Eval, CMMLU, AGIEval)
    or over all their questions (MMLU, GAOKAO-Bench)."""
    names = [n for n in names if correct.get(n)]
    if not names:
        return None
    questions = sum(len(correct[n]) for n in names)
    if benchmark.protocol(names[0]).weighting == "subjects":
        accuracy = float(np.mean([np.mean(correct[n]) for n in names]))
    else:
        accuracy = sum(sum(correct[n]) for n in names) / questions
    return {"accuracy": accuracy, "subjects": len(names), "questions": questions}


def summarize(benchmark: Benchmark, correct: dict[str, list[bool]]) -> dict:
    meta = benchmark.metadata()
    result = {"subjects": {s: {"accuracy": float(np.mean(c)), "questions": len(c)} for s, c in correct.items()},
              "categories": {}}
    for category in meta["categories"]:
        members = [s for s in correct if category in meta["subjects"].get(s, {}).get("categories", ())]
        if members:
            result["categories"][category] = average(benchmark, correct, members)
    result["average"] = average(benchmark, correct, list(correct))
    if "hard" in meta and average(benchmark, correct, meta["hard"]):
        result["average_hard"] = average(benchmark, correct, meta["hard"])
    return result


def prepare(benchmark: Benchmark, root: str | Path, *, split: str | None = None, shots: int = 0, subjects=None,
            limit: int | None = None) -> tuple[str, Split, dict[str, list[Item]]]:
    """(split, its questions, each subject's exemplars): every subject of `split` (or those in `subjects`,
    each cut to its first `limit` questions). Reads and checks everything without a model."""
    root = Path(root)
    split = split or benchmark.default_split
    questions = benchmark.load(root, split)
    if subjects:
        unknown = sorted(set(subjects) - set(questions.subjects))
        if unknown:
            raise BenchmarkError(f"{root}: no {split} questions for {', '.join(unknown)} ({benchmark.name})")
        questions.subjects = {s: questions.subjects[s] for s in subjects}
    if limit is not None:
        questions.subjects = {s: items[:limit] for s, items in questions.subjects.items()}
    return split, questions, exemplars(benchmark, root, questions, shots)


def evaluate(config, params, tokenizer, benchmark: Benchmark, root: str | Path, *, split: str | None = None,
             shots: int = 0, batch_size: int = 8, mesh=None, subjects=None, limit: int | None = None,
             prepared=None) -> dict:
    """Run `benchmark` (the directory `root` in its released layout) with `shots` exemplars per question
    (`prepare`'s arguments, or its result as `prepared`). Returns the summary with every item's letter
    scores under "items"."""
    split, questions, shot_items = prepared or prepare(benchmark, root, split=split, shots=shots,
                                                       subjects=subjects, limit=limit)
    shots = max((len(v) for v in shot_items.values()), default=0)
    built, cropped = prompts(benchmark, questions, shot_items, tokenizer, config.max_position_embeddings)
    requests = [(text, choice) for item, text in built for choice in benchmark.protocol(item.subject).choices(item)]
    scores = iter(loglikelihoods(config, params, tokenizer, requests, batch_size, mesh))
    correct: dict[str, list[bool]] = {}
    items = []
    for item, text in built:
        letter_scores = [next(scores)[0] for _ in item.options]
        prediction = LETTERS[int(np.argmax(letter_scores))]
        correct.setdefault(item.subject, []).append(prediction == item.answer)
        items.append({"where": item.where, "subject": item.subject, "answer": item.answer,
                      "prediction": prediction, "scores": letter_scores})
    return {"benchmark": benchmark.name, "split": split, "shots": shots, **summarize(benchmark, correct),
            "cropped": cropped, "skipped": questions.skipped, "items": items}


def report(result: dict) -> str:
    """The table each benchmark prints: subjects, categories, the average (and C-Eval's hard average)."""
    lines = [f"{result['benchmark']} {result['split']}, {result['shots']}-shot"]
    lines += [f"{s:<44} {r['accuracy']:6.1%}  ({r['questions']} questions)" for s, r in result["subjects"].items()]
    lines += [f"{c:<44} {r['accuracy']:6.1%}  ({r['subjects']} subjects)" for c, r in result["categories"].items()]
    lines.append(f"{'Average':<44} {result['average']['accuracy']:6.1%}  ({result['average']['questions']} questions)")
    if "average_hard" in result:
        lines.append(f"{'Average (Hard)':<44} {result['average_hard']['accuracy']:6.1%}  "
                     f"({result['average_hard']['subjects']} subjects)")
    if result["skipped"]:
        lines.append("skipped: " + ", ".join(f"{n} {why}" for why, n in sorted(result["skipped"].items())))
    if result["cropped"]:
        lines.append(f"{result['cropped']} prompts dropped exemplars to fit the model's positions")
    return "\n".join(lines)
