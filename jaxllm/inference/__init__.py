"""Inference: KV-cached batched generation, sampling, the `generate` and `chat` commands."""
from jaxllm.inference.generate import Generation, bucket, generate, left_pad, stream
from jaxllm.inference.sampling import FAMILY_DEFAULTS, SamplingParams, sample

__all__ = ["Generation", "generate", "stream", "bucket", "left_pad", "SamplingParams", "FAMILY_DEFAULTS", "sample"]
