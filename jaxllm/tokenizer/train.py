"""BPE training with the Baichuan 2 recipe (spec §6.5), streaming from text / jsonl files."""
from __future__ import annotations

import gzip
import io
import json
from pathlib import Path
from typing import Iterable, Iterator

import sentencepiece as spm

from jaxllm.tokenizer.errors import TokenizerError

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


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 file, gzip-compressed when named *.gz; errors name file:line."""
    number = 0
    try:
        with (gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")) as f:
            for number, raw in enumerate(f, 1):
                try:
                    yield number, raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError as err:
                    raise TokenizerError(f"{path}:{number}: not UTF-8 text ({err.reason} at byte "
                                         f"{err.start})") from None
    except (OSError, EOFError) as err:  # a truncated or non-gzip *.gz file
        raise TokenizerError(f"{path}:{number + 1}: cannot read: {err}") from None


def iter_texts(files: Iterable[str | Path], text_field: str = "text") -> Iterator[str]:
    """Non-empty lines of text files, or the lines of `text_field` of jsonl(.gz) records."""
    for file in files:
        path = Path(file)
        if not path.is_file():
            raise TokenizerError(f"{path}: no such corpus file")
        is_jsonl = ".jsonl" in path.name or path.name.endswith(".json")
        for number, line in _lines(path):
            if not line.strip():
                continue
            if not is_jsonl:
                yield line
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise TokenizerError(f"{path}:{number}: bad JSON: {err.msg}") from None
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise TokenizerError(f"{path}:{number}: no string field '{text_field}'")
            yield from (t for t in text.split("\n") if t.strip())


def reserved_symbols(count: int) -> list[str]:
    """`<reserved_0>` … : placeholders at ids 3, 4, … (Baichuan keeps its chat markers 195/196 there)."""
    return [f"<reserved_{k}>" for k in range(count)]


def train_tokenizer(files, output_path: str | Path, vocab_size: int, *, text_field: str = "text",
                    max_sentences: int = 10_000_000, user_defined_symbols=(), reserved: int = 0,
                    num_threads: int = 2, **overrides) -> Path:
    """Train a BPE model on `files` with the Baichuan 2 recipe; writes `output_path` (a .model file).

    Sentences are streamed from the files; at most `max_sentences` of them are kept (a uniform sample).
    Ids: 0 `<unk>`, 1 `<s>`, 2 `</s>`, then `reserved` placeholder pieces (`reserved >= 194` frees ids
    195/196 for the baichuan2-chat template), then `user_defined_symbols` (atomic), then 256 byte pieces.
    """
    files = [Path(f) for f in ([files] if isinstance(files, (str, Path)) else files)]
    if reserved < 0:
        raise TokenizerError(f"reserved={reserved} must be >= 0")
    user_defined_symbols = list(dict.fromkeys([*reserved_symbols(reserved), *user_defined_symbols]))
    minimum = BYTE_PIECES + SPECIAL_PIECES + len(user_defined_symbols) + 1
    if vocab_size < minimum:
        raise TokenizerError(f"vocab_size={vocab_size} is smaller than the {BYTE_PIECES} byte-fallback "
                             f"pieces + {SPECIAL_PIECES} specials + {len(user_defined_symbols)} user symbols "
                             f"(need at least {minimum})")
    if max_sentences <= 100:  # sentencepiece's own floor for its sample
        raise TokenizerError(f"max_sentences={max_sentences} must be > 100")
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
