"""The tokenizer object: sentencepiece itself, with the ids and conveniences a trainer needs."""
from __future__ import annotations

import os
from pathlib import Path

import sentencepiece as spm


class TokenizerError(ValueError):
    """Bad tokenizer input (file, corpus, conversation); the message says what was expected."""


class Tokenizer:
    """A sentencepiece model. `vocab_size` counts its pieces, which may be fewer than a model's padded
    embedding rows (Ziya 39,410 of 39,424); ids past the pieces are never produced and decode to nothing."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(self.path))
        except (OSError, RuntimeError) as err:
            raise TokenizerError(f"{self.path}: not a sentencepiece model ({str(err).splitlines()[0]})") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """From a `tokenizer.model` file or a directory holding one (an HF model directory)."""
        path = Path(path)
        if path.is_dir():
            if not (path / "tokenizer.model").is_file():
                raise TokenizerError(f"{path}: directory has no tokenizer.model")
            path = path / "tokenizer.model"
        elif not path.is_file():
            raise TokenizerError(f"{path}: no such tokenizer file")
        return cls(path)

    @property
    def vocab_size(self) -> int:
        return self.sp.GetPieceSize()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def unk_id(self) -> int:
        return self.sp.unk_id()

    @property
    def pad_id(self) -> int:
        """The model's pad id, or unk (Llama 2 defines none: `pad_id` -1)."""
        pad = self.sp.pad_id()
        return pad if pad >= 0 else max(self.unk_id, 0)

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.sp.Encode(text)
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def encode_batch(self, texts: list[str], *, bos: bool = False, eos: bool = False) -> list[list[int]]:
        return [[self.bos_id] * bos + ids + [self.eos_id] * eos for ids in self.sp.Encode(list(texts))]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """ids and the byte span [begin, end) of the text each piece covers."""
        proto = self.sp.Encode(text, return_type="proto")
        return [p.id for p in proto.pieces], [(p.begin, p.end) for p in proto.pieces]

    def decode(self, ids) -> str:
        n = self.vocab_size
        return self.sp.Decode([int(i) for i in ids if 0 <= int(i) < n])

    def decode_batch(self, batch) -> list[str]:
        return [self.decode(ids) for ids in batch]

    def id_to_piece(self, i: int) -> str:
        return self.sp.IdToPiece(int(i))

    def piece_to_id(self, piece: str) -> int:
        """The id of `piece`, or unk's id if the model has no such piece."""
        return self.sp.PieceToId(piece)

    def is_byte(self, i: int) -> bool:
        """Whether id `i` is a byte-fallback piece `<0xNN>`."""
        return 0 <= int(i) < self.vocab_size and self.sp.IsByte(int(i))

    def has_piece(self, piece: str) -> bool:
        i = self.sp.PieceToId(piece)
        return i != self.unk_id or piece == self.id_to_piece(self.unk_id)

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"
