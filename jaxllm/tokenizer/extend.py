"""Vocabulary extension (Ziya recipe, spec §8): append pieces to a model, keep every old id, and grow a
checkpoint's embedding and output rows to match (new rows = mean of the old ones)."""
from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Iterable

import numpy as np
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from jaxllm.tokenizer.sp import Tokenizer, TokenizerError


def read_proto(path: str | Path) -> sp_pb2.ModelProto:
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"{path}: no such tokenizer file")
    proto = sp_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as err:  # protobuf raises its own DecodeError
        raise TokenizerError(f"{path}: not a sentencepiece model ({err})") from None
    if not proto.pieces:
        raise TokenizerError(f"{path}: not a sentencepiece model (no pieces)")
    return proto


def pieces_of(model_path: str | Path) -> list[str]:
    """The normal and user-defined pieces of another model (what Chinese-LLaMA/Ziya merged in)."""
    kinds = (sp_pb2.ModelProto.SentencePiece.NORMAL, sp_pb2.ModelProto.SentencePiece.USER_DEFINED)
    return [p.piece for p in read_proto(model_path).pieces if p.type in kinds]


def extend_tokenizer(base_model: str | Path, out_path: str | Path, pieces: Iterable[str] = (), *,
                     special_tokens: Iterable[str] = ()) -> Path:
    """Write `out_path`: the base model with `pieces` (and atomic `special_tokens` such as `<human>`)
    appended in order, deduplicated against the base and each other. Old ids are unchanged."""
    proto = read_proto(base_model)
    seen = {p.piece for p in proto.pieces}
    # Appended pieces score below every learned merge so they never reorder the base model's merges.
    score = min((p.score for p in proto.pieces), default=0.0) - 1.0
    for piece, kind in ([(p, sp_pb2.ModelProto.SentencePiece.NORMAL) for p in pieces] +
                        [(p, sp_pb2.ModelProto.SentencePiece.USER_DEFINED) for p in special_tokens]):
        if not piece or piece in seen:
            continue
        seen.add(piece)
        new = proto.pieces.add()
        new.piece, new.score, new.type = piece, score if kind == sp_pb2.ModelProto.SentencePiece.NORMAL else 0.0, kind
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_bytes(proto.SerializeToString())
    tmp.replace(out_path)
    Tokenizer(out_path)  # loads, or raises naming the file
    return out_path


def padded_rows(num_pieces: int, pad_multiple: int) -> int:
    return int(math.ceil(num_pieces / pad_multiple) * pad_multiple)


def resize_params(params: dict, old_pieces: int, new_rows: int) -> dict:
    """Grow `embedding` [vocab, embed] and `lm_head` [embed, vocab] to `new_rows`; rows past the old
    model's rows are the mean of its first `old_pieces` (real) rows."""
    params = dict(params)
    emb = np.asarray(params["embedding"])
    if new_rows < emb.shape[0]:
        raise TokenizerError(f"cannot shrink the embedding from {emb.shape[0]} to {new_rows} rows")
    mean = emb[:old_pieces].mean(axis=0, keepdims=True)
    params["embedding"] = np.concatenate([emb, np.repeat(mean, new_rows - emb.shape[0], 0)]).astype(emb.dtype)
    if "lm_head" in params:
        head = np.asarray(params["lm_head"])
        col = head[:, :old_pieces].mean(axis=1, keepdims=True)
        params["lm_head"] = np.concatenate([head, np.repeat(col, new_rows - head.shape[1], 1)],
                                           axis=1).astype(head.dtype)
    return params


def resize_checkpoint(src_dir: str | Path, dst_dir: str | Path, new_num_pieces: int, *,
                      pad_multiple: int = 1, tokenizer_path: str | Path | None = None) -> Path:
    """Copy a jaxllm checkpoint with its vocabulary grown to `new_num_pieces` pieces, padded to a
    multiple of `pad_multiple` rows (Ziya: 39,410 pieces → 39,424 rows with 16)."""
    from jaxllm.checkpoint import load_params, save_params, to_numpy

    dst_dir = Path(dst_dir)
    if dst_dir.exists():
        raise TokenizerError(f"{dst_dir}: destination exists; choose a new directory")
    params, config = load_params(src_dir)
    rows = padded_rows(new_num_pieces, pad_multiple)
    if new_num_pieces < config.num_pieces:
        raise TokenizerError(f"new vocabulary ({new_num_pieces} pieces) is smaller than the checkpoint's "
                             f"({config.num_pieces})")
    params = resize_params(to_numpy(params), config.num_pieces, max(rows, config.vocab_size))
    new_config = config.replace(vocab_size=max(rows, config.vocab_size),
                                tokenizer_vocab_size=new_num_pieces)
    tmp = dst_dir.with_name(dst_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_params(tmp, params, new_config)
    if tokenizer_path is not None:
        shutil.copyfile(tokenizer_path, tmp / "tokenizer.model")
    tmp.rename(dst_dir)
    return dst_dir


def tokenizer_stats(tok: Tokenizer, files, text_field: str = "text") -> dict:
    """Characters and UTF-8 bytes per token over a corpus (higher is better compression)."""
    from jaxllm.tokenizer.train import iter_texts

    chars = nbytes = tokens = 0
    for text in iter_texts(files, text_field):
        chars += len(text)
        nbytes += len(text.encode())
        tokens += len(tok.encode(text))
    if tokens == 0:
        raise TokenizerError("empty corpus: no text to measure")
    return {"characters": chars, "bytes": nbytes, "tokens": tokens, "chars_per_token": chars / tokens,
            "bytes_per_token": nbytes / tokens}
