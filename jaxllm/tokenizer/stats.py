"""Compression figures of a tokenizer on a corpus: what an extension buys (Ziya extended LLaMA because
it split most Chinese characters into UTF-8 bytes)."""
from __future__ import annotations

from jaxllm.tokenizer.errors import TokenizerError
from jaxllm.tokenizer.sp import Tokenizer
from jaxllm.tokenizer.train import iter_texts


def tokenizer_stats(tok: Tokenizer, files, text_field: str = "text") -> dict:
    """Characters and UTF-8 bytes per token over a corpus (higher is better compression)."""
    chars = nbytes = tokens = 0
    for text in iter_texts(files, text_field):
        chars += len(text)
        nbytes += len(text.encode())
        tokens += len(tok.encode(text))
    if tokens == 0:
        raise TokenizerError("empty corpus: no text to measure")
    return {"characters": chars, "bytes": nbytes, "tokens": tokens, "chars_per_token": chars / tokens,
            "bytes_per_token": nbytes / tokens}
