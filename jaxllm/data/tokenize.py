"""Tokenizer loading and the document → token-ids map of the pipeline."""
from __future__ import annotations

import numpy as np

from jaxllm import storage
from jaxllm.data.files import DataError, resolve_path


def load_tokenizer(path: str):
    """`jaxllm.tokenizer.Tokenizer` for a sentencepiece model path (`assets:NAME` for shipped files)."""
    from jaxllm.tokenizer import Tokenizer

    resolved = resolve_path(str(path))
    if not storage.is_file(resolved):  # gs://… and s3://… too
        raise DataError(f"data.tokenizer: no tokenizer model at '{path}'")
    return Tokenizer.load(resolved)


class Tokenize:
    """str → int32[n] ids, with BOS/EOS as asked. Picklable, stateless: a grain `map`."""

    def __init__(self, tokenizer, add_bos: bool, add_eos: bool):
        self.tokenizer, self.add_bos, self.add_eos = tokenizer, add_bos, add_eos
        for flag, name, value in ((add_bos, "bos", tokenizer.bos_id), (add_eos, "eos", tokenizer.eos_id)):
            if flag and (value is None or value < 0):
                raise DataError(f"data.add_{name} is set but the tokenizer has no {name.upper()} piece")

    def __call__(self, text: str) -> np.ndarray:
        ids = self.tokenizer.encode(text, bos=self.add_bos, eos=self.add_eos)
        return np.asarray(ids, np.int32)
