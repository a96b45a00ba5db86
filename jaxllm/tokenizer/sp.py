"""The tokenizer object: sentencepiece itself, with the ids and conveniences a trainer needs."""
from __future__ import annotations

import os
import re

import sentencepiece as spm

from jaxllm import storage
from jaxllm.tokenizer.errors import TokenizerError


class Tokenizer:
    """A sentencepiece model plus the HF files beside a `tokenizer.model` (`added_tokens.json`,
    `tokenizer_config.json`): the one place that knows added tokens and whether text starts with BOS.

    Added tokens (Ziya's `<human>` 39408 and `<bot>` 39409) are cut out of the text first, as transformers'
    slow sentencepiece tokenizer does, and every piece of text between them is encoded by sentencepiece on
    its own. The model's control pieces (`<s>`, `</s>`, `<unk>`) are never made from text, as in
    sentencepiece and Meta's reference: text cannot forge a turn's end.

    `vocab_size` counts the ids it can produce: pieces plus added tokens (Ziya 39,410), which may be
    fewer than a model's padded embedding rows (39,424); other ids decode to nothing. `add_bos` is
    `tokenizer_config.json`'s `add_bos_token`, else the family's default (`add_bos_source` says which).
    """

    def __init__(self, path: str | os.PathLike, *, family: str | None = None):
        from jaxllm.tokenizer.hf_files import FAMILY_ADD_BOS, TokenizerFiles, read_tokenizer_files

        self.path = storage.path(path)
        self.sp = spm.SentencePieceProcessor()
        try:
            if storage.is_remote(self.path):
                self.sp.LoadFromSerializedProto(storage.read_bytes(self.path))
            else:
                self.sp.Load(str(self.path))
        except (OSError, RuntimeError) as err:
            raise TokenizerError(f"{self.path}: not a sentencepiece model ({str(err).splitlines()[0]})") from None
        # HF's files belong to a `tokenizer.model` (a bare `llama2.model` beside others has none)
        files = read_tokenizer_files(self.path.parent) if self.path.name == "tokenizer.model" else TokenizerFiles()
        self._set_added(files.added)
        if files.add_bos is not None:
            self.add_bos, self.add_bos_source = files.add_bos, f"{files.where}: add_bos_token"
        else:
            self.add_bos = FAMILY_ADD_BOS.get(family, True)
            self.add_bos_source = f"the {family} default" if family else "the sentencepiece default"

    def _set_added(self, added) -> None:
        n = self.sp.GetPieceSize()
        self.added = {}  # content → AddedToken, for those cut out of text
        self.added_by_id = {}
        for token in added:
            if token.id < n:
                piece = self.sp.IdToPiece(token.id)
                if piece != token.content:
                    raise TokenizerError(f"{token.where}: added token {token.content!r} has id {token.id}, which "
                                         f"is the piece {piece!r} of {self.path.name}")
                if self.sp.IsControl(token.id) or self.sp.IsUnknown(token.id):
                    continue  # <s>, </s>, <unk>: ids only, never made from text
            self.added[token.content] = token
            self.added_by_id[token.id] = token
        contents = sorted(self.added, key=len, reverse=True)  # the longest token wins where two start
        self._pattern = re.compile("|".join(map(re.escape, contents))) if contents else None
        self._size = max([n] + [i + 1 for i in self.added_by_id])

    @classmethod
    def load(cls, path: str | os.PathLike, *, family: str | None = None) -> "Tokenizer":
        """From a `tokenizer.model` file or a directory holding one (an HF model directory). `family`
        gives the BOS default when the HF files do not say."""
        path = storage.path(path)
        if path.is_dir():
            if not (path / "tokenizer.model").is_file():
                raise TokenizerError(f"{path}: directory has no tokenizer.model")
            path = path / "tokenizer.model"
        elif not path.is_file():
            raise TokenizerError(f"{path}: no such tokenizer file")
        return cls(path, family=family)

    @property
    def vocab_size(self) -> int:
        """Ids this tokenizer can produce: sentencepiece pieces, then added tokens."""
        return self._size

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

    def _spans(self, text: str) -> list[tuple[int, int, int | None]]:
        """(begin, end, id) character spans covering `text` in order: an added token (id), or text for
        sentencepiece (None), with the whitespace an added token strips left out."""
        if self._pattern is None:
            return [(0, len(text), None)]
        spans, cursor = [], 0
        for match in self._pattern.finditer(text):
            spans.append((cursor, match.start(), None))
            spans.append((match.start(), match.end(), self.added[match.group()].id))
            cursor = match.end()
        spans.append((cursor, len(text), None))
        for k, (begin, end, i) in enumerate(spans):
            if i is None:
                continue
            token = self.added_by_id[i]
            if token.lstrip:
                b, e, _ = spans[k - 1]
                spans[k - 1] = (b, b + len(text[b:e].rstrip()), None)
            if token.rstrip:
                b, e, _ = spans[k + 1]
                spans[k + 1] = (e - len(text[b:e].lstrip()), e, None)
        return [s for s in spans if s[2] is not None or s[1] > s[0]]

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text`, with BOS / EOS when asked (`bos=tok.add_bos` is what the model's own
        tokenizer does)."""
        if self._pattern is None:
            ids = self.sp.Encode(text)
        else:
            ids = []
            for begin, end, i in self._spans(text):
                ids += [i] if i is not None else self.sp.Encode(text[begin:end])
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def encode_batch(self, texts: list[str], *, bos: bool = False, eos: bool = False) -> list[list[int]]:
        if self._pattern is not None:
            return [self.encode(text, bos=bos, eos=eos) for text in texts]
        return [[self.bos_id] * bos + ids + [self.eos_id] * eos for ids in self.sp.Encode(list(texts))]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """ids and the byte span [begin, end) of the text each piece covers."""
        ids, offsets = [], []
        for begin, end, i in self._spans(text):
            start = len(text[:begin].encode())
            if i is not None:
                ids.append(i)
                offsets.append((start, len(text[:end].encode())))
                continue
            proto = self.sp.Encode(text[begin:end], return_type="proto")
            ids += [p.id for p in proto.pieces]
            offsets += [(start + p.begin, start + p.end) for p in proto.pieces]
        return ids, offsets

    def decode(self, ids) -> str:
        """Text of `ids`: pieces through sentencepiece, added tokens as themselves; other ids (padded
        embedding rows) are skipped."""
        n, out, run = self.sp.GetPieceSize(), [], []
        for i in map(int, ids):
            if i in self.added_by_id:
                out.append(self.sp.Decode(run))
                out.append(self.added_by_id[i].content)
                run = []
            elif 0 <= i < n:
                run.append(i)
        out.append(self.sp.Decode(run))
        return "".join(out)

    def decode_batch(self, batch) -> list[str]:
        return [self.decode(ids) for ids in batch]

    def id_to_piece(self, i: int) -> str:
        i = int(i)
        return self.added_by_id[i].content if i in self.added_by_id else self.sp.IdToPiece(i)

    def piece_to_id(self, piece: str) -> int:
        """The id of `piece` (or added token), or unk's id if there is none."""
        return self.added[piece].id if piece in self.added else self.sp.PieceToId(piece)

    def is_byte(self, i: int) -> bool:
        """Whether id `i` is a byte-fallback piece `<0xNN>`."""
        return 0 <= int(i) < self.sp.GetPieceSize() and self.sp.IsByte(int(i))

    def has_piece(self, piece: str) -> bool:
        """Whether `piece` is one id: a sentencepiece piece or an added token."""
        if piece in self.added:
            return True
        i = self.sp.PieceToId(piece)
        return i != self.unk_id or piece == self.sp.IdToPiece(self.unk_id)

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"
