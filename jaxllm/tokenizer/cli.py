"""`jaxllm tokenizer train | extend | encode | decode | stats`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxllm tokenizer", description=__doc__)
    sub = parser.add_subparsers(dest="action", required=True)

    train = sub.add_parser("train", help="train a BPE model with the Baichuan 2 recipe")
    train.add_argument("files", nargs="+", help="text, jsonl or jsonl.gz files")
    train.add_argument("--output", "-o", required=True, help="path of the .model file to write")
    train.add_argument("--vocab-size", type=int, required=True)
    train.add_argument("--text-field", default="text", help="jsonl field holding the text")
    train.add_argument("--max-sentences", type=int, default=10_000_000, help="sentences sampled at most")
    train.add_argument("--special", action="append", default=[], help="user-defined special token (repeat)")
    train.add_argument("--reserved", type=int, default=0,
                       help="placeholder pieces at ids 3.. (>= 194 frees ids 195/196 for baichuan2-chat)")

    extend = sub.add_parser("extend", help="add pieces to a model (Ziya recipe) and resize a checkpoint")
    extend.add_argument("--model", required=True, help="base tokenizer.model")
    extend.add_argument("--output", "-o", required=True, help="extended .model to write")
    extend.add_argument("--pieces-file", help="one piece per line (e.g. common Chinese characters)")
    extend.add_argument("--from-model", help="add the pieces of another sentencepiece model")
    extend.add_argument("--special", action="append", default=[], help="atomic special token (repeat)")
    extend.add_argument("--checkpoint", help="jaxllm checkpoint to resize to the new vocabulary")
    extend.add_argument("--checkpoint-out", help="where to write the resized checkpoint")
    extend.add_argument("--pad-multiple", type=int, default=1, help="pad embedding rows to a multiple")

    encode = sub.add_parser("encode", help="print the ids (or pieces) of TEXT")
    encode.add_argument("--model", required=True)
    encode.add_argument("text", help="the text; '-' reads it from stdin")
    encode.add_argument("--bos", action="store_true")
    encode.add_argument("--eos", action="store_true")
    encode.add_argument("--pieces", action="store_true", help="print pieces instead of ids")

    decode = sub.add_parser("decode", help="print the text of space-separated IDS")
    decode.add_argument("--model", required=True)
    decode.add_argument("ids", nargs="+", help="ids (space- or comma-separated); '-' reads them from stdin")

    stats = sub.add_parser("stats", help="characters and bytes per token on a corpus")
    stats.add_argument("--model", required=True, action="append", help="model(s) to compare (repeat)")
    stats.add_argument("files", nargs="+")
    stats.add_argument("--text-field", default="text")
    return parser


def read_pieces(path: str | Path) -> list[str]:
    """Non-empty stripped lines of a UTF-8 pieces file; a bad byte is an error naming file:line."""
    from jaxllm.tokenizer import TokenizerError

    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"{path}: no such pieces file")
    pieces = []
    for number, raw in enumerate(path.read_bytes().split(b"\n"), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise TokenizerError(f"{path}:{number}: not UTF-8 text ({err.reason} at byte {err.start}); "
                                 f"expected one piece per line") from None
        if line.strip():
            pieces.append(line.strip())
    return pieces


def _extend(args) -> None:
    """Check everything the checkpoint step needs before writing anything, then write the model next to
    its destination and move it into place only once the resized checkpoint (if any) is written."""
    import os
    import tempfile

    from jaxllm.checkpoint import read_model_config, resolve
    from jaxllm.tokenizer import Tokenizer, TokenizerError, extend_tokenizer, resize_checkpoint

    pieces = read_pieces(args.pieces_file) if args.pieces_file else []
    if not pieces and not args.from_model and not args.special:
        raise TokenizerError("nothing to add: give --pieces-file, --from-model or --special")
    before = Tokenizer.load(args.model).vocab_size
    if args.pad_multiple < 1:
        raise TokenizerError(f"--pad-multiple={args.pad_multiple} must be >= 1")
    source = None
    if args.checkpoint_out and not args.checkpoint:
        raise TokenizerError("--checkpoint-out needs --checkpoint (the checkpoint to resize)")
    if args.checkpoint:
        if not args.checkpoint_out:
            raise TokenizerError("--checkpoint needs --checkpoint-out")
        if Path(args.checkpoint_out).exists():
            raise TokenizerError(f"{args.checkpoint_out}: destination exists; choose a new directory")
        source = read_model_config(resolve(args.checkpoint))  # raises CheckpointError naming the directory
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        extend_tokenizer(args.model, tmp, pieces, from_model=args.from_model, special_tokens=args.special)
        after = Tokenizer(tmp).vocab_size
        if source is not None:
            if after < source.num_pieces:
                raise TokenizerError(f"the extended model has {after} pieces, fewer than the {source.num_pieces} "
                                     f"of checkpoint {args.checkpoint}: extend the checkpoint's own tokenizer")
            out = resize_checkpoint(args.checkpoint, args.checkpoint_out, after, pad_multiple=args.pad_multiple,
                                    tokenizer_path=tmp)
        tmp.replace(output)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"wrote {output}: {before} → {after} pieces (+{after - before})")
    if source is not None:
        print(f"wrote {out} (embedding rows padded to a multiple of {args.pad_multiple})")


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from jaxllm.checkpoint import CheckpointError
    from jaxllm.tokenizer import Tokenizer, TokenizerError, tokenizer_stats, train_tokenizer

    try:
        if args.action == "train":
            path = train_tokenizer(args.files, args.output, args.vocab_size, text_field=args.text_field,
                                   max_sentences=args.max_sentences, user_defined_symbols=args.special,
                                   reserved=args.reserved)
            print(f"wrote {path} ({Tokenizer(path).vocab_size} pieces)")
        elif args.action == "extend":
            _extend(args)
        elif args.action == "encode":
            tok = Tokenizer.load(args.model)
            text = sys.stdin.read().removesuffix("\n") if args.text == "-" else args.text
            ids = tok.encode(text, bos=args.bos, eos=args.eos)
            print(" ".join(tok.id_to_piece(i) for i in ids) if args.pieces else " ".join(map(str, ids)))
        elif args.action == "decode":
            tok = Tokenizer.load(args.model)
            raw = sys.stdin.read() if args.ids == ["-"] else " ".join(args.ids)
            try:
                ids = [int(x) for x in raw.replace(",", " ").replace("[", " ").replace("]", " ").split()]
            except ValueError:
                raise TokenizerError(f"ids must be integers, got {raw.strip()!r:.200}") from None
            print(tok.decode(ids))
        elif args.action == "stats":
            rows = []
            for model in args.model:
                tok = Tokenizer.load(model)
                rows.append((model, tok.vocab_size, tokenizer_stats(tok, args.files, args.text_field)))
            print(f"{'model':<40} {'pieces':>7} {'tokens':>9} {'chars/token':>11} {'bytes/token':>11}")
            for model, pieces, s in rows:
                print(f"{model:<40} {pieces:>7} {s['tokens']:>9} {s['chars_per_token']:>11.3f} "
                      f"{s['bytes_per_token']:>11.3f}")
    except (TokenizerError, CheckpointError) as err:
        print(f"jaxllm tokenizer: error: {err}", file=sys.stderr)
        return 2
    return 0
