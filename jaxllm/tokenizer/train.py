"""BPE training with the Baichuan 2 recipe (spec §6.5), streaming from text / jsonl files."""
from __future__ import annotations

import gzip
import io
import json
from pathlib import Path
from typing import Iterable, Iterator

import sentencepiece as spm

from jaxllm.tokenizer.sp import TokenizerError

# Baichuan 2: digits split, byte fallback for rare characters, long pieces for Chinese phrases, no
# normalisation and no dummy prefix, whitespace-only pieces (code indentation).
BAICHUAN2_RECIPE = dict(
    model_type="bpe",
    split_digits=True,
    byte_fallback=True,
    max_sentencepiece_length=32,
    character_coverage=0.9999,
    normalization_rule_name="identity",
    add_dummy_prefix=False,
    remove_extra_whitespaces=False,
    allow_whitespace_only_pieces=True,
    split_by_whitespace=True,
    unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
)
BYTE_PIECES = 256
SPECIAL_PIECES = 3  # <unk> <s> </s>


def _open(path: Path):
    raw = open(path, "rb")
    return gzip.open(raw) if path.name.endswith(".gz") else raw


def iter_texts(files: Iterable[str | Path], text_field: str = "text") -> Iterator[str]:
    """Lines of text files, or `text_field` of jsonl(.gz) records; non-UTF-8 stops with file:line."""
    for file in files:
        path = Path(file)
        if not path.is_file():
            raise TokenizerError(f"{path}: no such corpus file")
        is_jsonl = ".jsonl" in path.name or path.name.endswith(".json")
        with _open(path) as f:
            for number, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise TokenizerError(f"{path}:{number}: not UTF-8 text ({err.reason} at byte "
                                         f"{err.start})") from None
                if is_jsonl:
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise TokenizerError(f"{path}:{number}: bad JSON: {err.msg}") from None
                    text = record.get(text_field) if isinstance(record, dict) else None
                    if not isinstance(text, str):
                        raise TokenizerError(f"{path}:{number}: no string field '{text_field}'")
                    yield from (t for t in text.split("\n") if t.strip())
                elif line.strip():
                    yield line.rstrip("\n")


def train_tokenizer(files, output_path: str | Path, vocab_size: int, *, text_field: str = "text",
                    max_sentences: int = 10_000_000, user_defined_symbols=(), num_threads: int = 2,
                    **overrides) -> Path:
    """Train a BPE model on `files` with the Baichuan 2 recipe; writes `output_path` (a .model file)."""
    files = [Path(f) for f in ([files] if isinstance(files, (str, Path)) else files)]
    user_defined_symbols = list(dict.fromkeys(user_defined_symbols))
    minimum = BYTE_PIECES + SPECIAL_PIECES + len(user_defined_symbols) + 1
    if vocab_size < minimum:
        raise TokenizerError(f"vocab_size={vocab_size} is smaller than the {BYTE_PIECES} byte-fallback "
                             f"pieces + {SPECIAL_PIECES} specials + {len(user_defined_symbols)} user symbols "
                             f"(need at least {minimum})")
    texts = iter_texts(files, text_field)
    first = next(texts, None)
    if first is None:
        raise TokenizerError(f"empty corpus: no text in {', '.join(map(str, files))}")

    def sentences():
        yield first
        yield from texts

    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    options = {**BAICHUAN2_RECIPE, **overrides}
    try:
        spm.SentencePieceTrainer.Train(
            sentence_iterator=sentences(), model_writer=model, vocab_size=vocab_size,
            input_sentence_size=max_sentences, shuffle_input_sentence=True,
            user_defined_symbols=user_defined_symbols, num_threads=num_threads,
            minloglevel=2, **options)
    except RuntimeError as err:
        raise TokenizerError(f"sentencepiece training failed: {str(err).splitlines()[0]}") from None
    tmp = output_path.with_name(output_path.name + ".tmp")
    tmp.write_bytes(model.getvalue())
    tmp.replace(output_path)
    return output_path
