"""Vocabulary extension (Ziya recipe, spec §8): append pieces to a model, keep every old id, and grow a
checkpoint's embedding and output rows to match (new rows = mean of the old ones)."""
from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Iterable

import numpy as np
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from jaxllm.tokenizer.errors import TokenizerError
from jaxllm.tokenizer.sp import Tokenizer


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


_NORMAL, _USER = sp_pb2.ModelProto.SentencePiece.NORMAL, sp_pb2.ModelProto.SentencePiece.USER_DEFINED


def _typed_pieces(model_path: str | Path) -> list[tuple[str, int]]:
    return [(p.piece, p.type) for p in read_proto(model_path).pieces if p.type in (_NORMAL, _USER)]


def pieces_of(model_path: str | Path) -> list[str]:
    """The normal and user-defined pieces of another model, in id order (what Chinese-LLaMA merged in)."""
    return [piece for piece, _ in _typed_pieces(model_path)]


def extend_tokenizer(base_model: str | Path, out_path: str | Path, pieces: Iterable[str] = (), *,
                     from_model: str | Path | None = None, special_tokens: Iterable[str] = ()) -> Path:
    """Write `out_path`: the base model with `pieces`, then the pieces of `from_model`, then atomic
    `special_tokens` (e.g. `<human>`) appended in that order, deduplicated against the base and each other.
    Every old piece keeps its id. A space in a piece means the word boundary `▁`."""
    proto = read_proto(base_model)
    beyond = [t for t in Tokenizer(base_model).added.values() if t.id >= len(proto.pieces)]
    if beyond:  # appended pieces would take their ids
        raise TokenizerError(f"{base_model}: its added token {beyond[0].content!r} has id {beyond[0].id}, past "
                             f"the {len(proto.pieces)} pieces; extending would give that id to a new piece")
    new_pieces = [(p.replace(" ", "▁"), _NORMAL) for p in pieces]
    if from_model is not None:
        new_pieces += _typed_pieces(from_model)  # its user-defined pieces stay atomic
    new_pieces += [(p, _USER) for p in special_tokens]
    seen = {p.piece for p in proto.pieces}
    # BPE merges by score: appended pieces rank below every base piece (the base still segments its own
    # text as before) and among themselves in the order given (a second model's merge order survives).
    # Sentinel scores (Llama's "▁▁" has -1e9) are left out: below them float32 cannot tell ranks apart.
    score = min((p.score for p in proto.pieces if p.type == _NORMAL and p.score > -1e8), default=0.0) - 1.0
    for piece, kind in new_pieces:
        if not piece or piece in seen:
            continue
        seen.add(piece)
        new = proto.pieces.add()
        new.piece, new.type = piece, kind
        if kind == _NORMAL:
            new.score, score = score, score - 1.0  # BPE scores are minus the merge rank
    proto.trainer_spec.vocab_size = len(proto.pieces)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_bytes(proto.SerializeToString())
    tmp.replace(out_path)
    Tokenizer(out_path)  # loads, or raises naming the file
    return out_path


def padded_rows(num_pieces: int, pad_multiple: int) -> int:
    """Embedding rows for `num_pieces` pieces, rounded up to a multiple of `pad_multiple`."""
    if pad_multiple < 1:
        raise TokenizerError(f"pad_multiple={pad_multiple} must be >= 1")
    return int(math.ceil(num_pieces / pad_multiple) * pad_multiple)


def resize_params(params: dict, old_pieces: int, new_rows: int) -> dict:
    """Grow `embedding` [vocab, embed] and `lm_head` [embed, vocab] to `new_rows`. Rows of the first
    `old_pieces` (trained) pieces are kept; every later row (new pieces and padding, including padding
    rows the old model never trained) is the mean of the trained rows."""
    params = dict(params)
    emb = np.asarray(params["embedding"])
    if new_rows < emb.shape[0]:
        raise TokenizerError(f"cannot shrink the embedding from {emb.shape[0]} to {new_rows} rows")
    mean = emb[:old_pieces].astype(np.float32).mean(axis=0, keepdims=True).astype(emb.dtype)
    params["embedding"] = np.concatenate([emb[:old_pieces], np.repeat(mean, new_rows - old_pieces, 0)])
    if "lm_head" in params:
        head = np.asarray(params["lm_head"])
        col = head[:, :old_pieces].astype(np.float32).mean(axis=1, keepdims=True).astype(head.dtype)
        params["lm_head"] = np.concatenate([head[:, :old_pieces], np.repeat(col, new_rows - old_pieces, 1)],
                                           axis=1)
    return params


def resize_checkpoint(src_dir: str | Path, dst_dir: str | Path, new_num_pieces: int, *,
                      pad_multiple: int = 1, tokenizer_path: str | Path | None = None) -> Path:
    """Copy a jaxllm checkpoint with its vocabulary grown to `new_num_pieces` pieces and its embedding /
    output rows padded to a multiple of `pad_multiple` (Ziya: 39,410 pieces → 39,424 rows with 16).
    `tokenizer_path` (the extended model) is copied in as `tokenizer.model`."""
    from jaxllm.checkpoint import load_params, read_model_config, resolve, save_params, to_numpy
    from jaxllm.checkpoint.companions import find_remote_code

    dst_dir = Path(dst_dir)
    if dst_dir.exists():
        raise TokenizerError(f"{dst_dir}: destination exists; choose a new directory")
    if tokenizer_path is not None:
        pieces = Tokenizer.load(tokenizer_path).vocab_size
        if pieces != new_num_pieces:
            raise TokenizerError(f"{tokenizer_path} has {pieces} pieces, not new_num_pieces={new_num_pieces}")
    config = read_model_config(resolve(src_dir))
    if new_num_pieces < config.num_pieces:
        raise TokenizerError(f"new vocabulary ({new_num_pieces} pieces) is smaller than the checkpoint's "
                             f"({config.num_pieces} pieces)")
    rows = max(padded_rows(new_num_pieces, pad_multiple), config.vocab_size)
    params, config = load_params(src_dir, config)
    params = resize_params(to_numpy(params), config.num_pieces, rows)
    new_config = config.replace(vocab_size=rows, tokenizer_vocab_size=new_num_pieces)
    tmp = dst_dir.with_name(dst_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_params(tmp, params, new_config)
    if tokenizer_path is not None:
        shutil.copyfile(Tokenizer.load(tokenizer_path).path, tmp / "tokenizer.model")
    code = find_remote_code(resolve(src_dir))
    if code is not None:  # the model's HF remote code stays with it (it reads vocab_size from config.json)
        shutil.copytree(code, tmp / code.name)
    tmp.rename(dst_dir)
    return dst_dir
