"""Evaluation: perplexity; multiple choice by letter log-likelihood, zero-shot on question files or by a
benchmark's own few-shot protocol (C-Eval, MMLU, CMMLU, AGIEval, GAOKAO-Bench: `benchmarks`, `fewshot`); the
lm-evaluation-harness adapter is `jaxllm.eval.harness` (optional: needs lm-eval)."""
from jaxllm.eval.benchmarks import BENCHMARKS, BenchmarkError, detect, locate
from jaxllm.eval.fewshot import evaluate
from jaxllm.eval.scoring import choice_accuracy, continuation_logprobs, loglikelihoods, perplexity, read_questions

__all__ = ["perplexity", "continuation_logprobs", "loglikelihoods", "choice_accuracy", "read_questions",
           "BENCHMARKS", "BenchmarkError", "detect", "locate", "evaluate"]
