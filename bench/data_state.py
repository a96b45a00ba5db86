"""Size and cost of the data-iterator state a checkpoint carries, with one long document in the stream:
the packer's position (what is saved now) against its buffered tokens (what was saved before).

    python bench/data_state.py                    # a 10 MB document, seq_len 4096, the demo tokenizer
    python bench/data_state.py --mb 1 --seq-len 512
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def make_corpus(directory: Path, megabytes: float) -> Path:
    """One document of `megabytes` of English text between two short ones."""
    words = "In the beginning God created the heaven and the earth . ".split()
    text, size, i = [], 0, 0
    while size < megabytes * 2**20:
        word = words[i % len(words)]
        text.append(word)
        size += len(word) + 1
        i += 1
    path = directory / "long.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for document in ("a short first document", " ".join(text), "a short last document"):
            f.write(json.dumps({"text": document}) + "\n")
    return path


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=10.0, help="size of the long document")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--rows", type=int, default=8, help="rows packed before the state is taken")
    args = parser.parse_args(argv)

    from jaxllm.data import DocumentSource, PackedRows, Tokenize, load_tokenizer

    tokenizer = load_tokenizer("assets:demo/tokenizer.model")
    with tempfile.TemporaryDirectory() as scratch:
        path = make_corpus(Path(scratch), args.mb)

        def rows():
            source = DocumentSource([path], shuffle=False)
            return iter(PackedRows(source.map(Tokenize(tokenizer, True, True)), args.seq_len))

        iterator = rows()
        for _ in range(args.rows):
            next(iterator)
        buffered = sum(t.size for t in iterator._packer._tokens)
        # As grain's checkpoint handler writes it (indent=4: one line per token in the old format).
        position, t_position = timed(lambda: json.dumps(iterator.get_state(), indent=4))
        # What get_state returned before positions: the parent's state plus every buffered token and its
        # document ordinal.
        contents, t_contents = timed(lambda: json.dumps({"parent": iterator._parent.get_state(),
                                                         "packer": iterator._packer.contents(),
                                                         "exhausted": False}, indent=4))
        expected = next(iterator)
        resumed = rows()
        _, t_restore = timed(lambda: resumed.set_state(json.loads(position)))
        same = all((next(resumed)[key] == expected[key]).all() for key in expected)
        legacy = rows()
        _, t_legacy = timed(lambda: legacy.set_state(json.loads(contents)))

    print(f"a {args.mb:g} MB document, {buffered:,} tokens buffered after {args.rows} rows of {args.seq_len}\n")
    table = [("tokens (before)", len(contents), t_contents, t_legacy),
             ("position (now)", len(position), t_position, t_restore)]
    print(f"{'state':<16}  {'file bytes':>12}  {'get + dump s':>12}  {'restore s':>10}")
    for name, size, dump, restore in table:
        print(f"{name:<16}  {size:>12,}  {dump:>12.3f}  {restore:>10.3f}")
    print(f"\nsize ratio tokens / position: {len(contents) / len(position):,.0f}x; "
          f"the restored position gives the same next row: {same}")


if __name__ == "__main__":
    main()
