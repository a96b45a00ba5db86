"""Evaluation: perplexity and multiple-choice (C-Eval / MMLU style) accuracy by log-likelihood."""
from jaxllm.eval.scoring import choice_accuracy, continuation_logprobs, perplexity, read_questions

__all__ = ["perplexity", "continuation_logprobs", "choice_accuracy", "read_questions"]
