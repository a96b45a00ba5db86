"""What an HF tokenizer directory says beyond `tokenizer.model`: its added tokens (`added_tokens.json`,
`tokenizer_config.json`'s `added_tokens_decoder`) and whether a text starts with BOS (`add_bos_token`).

Ziya's `<human>` / `<bot>` are such added tokens (ids 39408 / 39409, past the 39,408 sentencepiece
pieces); Baichuan 2's and Baichuan-13B's `tokenizer_config.json` say `add_bos_token: false`.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from jaxllm import storage

from jaxllm.tokenizer.errors import TokenizerError

# BOS when the tokenizer's files say nothing: sentencepiece / Llama convention, Baichuan-7B's
# tokenization_baichuan.py default; Baichuan 2 adds none (spec §6.5).
FAMILY_ADD_BOS = {"llama": True, "ziya": True, "ctllm": True, "baichuan": True, "baichuan2": False}


@dataclasses.dataclass(frozen=True)
class AddedToken:
    """A token matched in text before sentencepiece sees it; `lstrip` / `rstrip` eat the whitespace on
    that side of it (transformers' AddedToken flags)."""
    content: str
    id: int
    lstrip: bool = False
    rstrip: bool = False
    where: str = dataclasses.field(default="", compare=False)  # the file that declared it


@dataclasses.dataclass(frozen=True)
class TokenizerFiles:
    added: tuple[AddedToken, ...] = ()
    add_bos: bool | None = None     # None: tokenizer_config.json does not say
    where: str = ""                 # the file that said add_bos_token


def _read(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TokenizerError(f"{path}: invalid JSON: {getattr(err, 'msg', err)}") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _flag(entry: dict, name: str, where: str) -> bool:
    value = entry.get(name, False)
    if not isinstance(value, bool):
        raise TokenizerError(f"{where}: '{name}' must be true or false, got {value!r}")
    return value


def read_tokenizer_files(directory: str | Path) -> TokenizerFiles:
    """The added tokens and `add_bos_token` of the HF files in `directory` (none there: nothing added,
    add_bos None). A malformed file is a TokenizerError naming it and the entry."""
    directory = storage.path(directory)
    tokens: dict[str, AddedToken] = {}
    source: dict[str, str] = {}

    def add(token: AddedToken, where: str) -> None:
        old = tokens.get(token.content)
        if old is not None and old.id != token.id:
            raise TokenizerError(f"{where}: added token {token.content!r} has id {token.id}, but {old.id} in "
                                 f"{source[token.content]}")
        tokens[token.content] = token if old is None else dataclasses.replace(
            old, lstrip=old.lstrip or token.lstrip, rstrip=old.rstrip or token.rstrip)
        source[token.content] = where

    path = directory / "added_tokens.json"
    for content, i in (_read(path) or {}).items():
        if not isinstance(i, int) or isinstance(i, bool) or i < 0:
            raise TokenizerError(f"{path}: added token {content!r} must map to an integer id >= 0, got {i!r}")
        add(AddedToken(content, i, where=str(path)), str(path))
    path = directory / "tokenizer_config.json"
    config = _read(path) or {}
    decoder = config.get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        raise TokenizerError(f"{path}: 'added_tokens_decoder' must be an object of id → token")
    for key, entry in decoder.items():
        where = f"{path}: added_tokens_decoder[{key!r}]"
        if not str(key).isdigit() or not isinstance(entry, dict) or not isinstance(entry.get("content"), str) \
                or not entry["content"]:
            raise TokenizerError(f"{where}: expected an integer id mapping to {{\"content\": \"...\", ...}}")
        add(AddedToken(entry["content"], int(key), _flag(entry, "lstrip", where), _flag(entry, "rstrip", where),
                       str(path)), str(path))
    add_bos = config.get("add_bos_token")
    if add_bos is not None and not isinstance(add_bos, bool):
        raise TokenizerError(f"{path}: 'add_bos_token' must be true or false, got {add_bos!r}")
    return TokenizerFiles(tuple(sorted(tokens.values(), key=lambda t: t.id)), add_bos,
                          str(path) if add_bos is not None else "")
