"""Streaming text out of a growing list of token ids: only whole characters, never a stop string or
text that may be the start of one."""
from __future__ import annotations

from typing import Callable, Sequence

from jaxllm.inference.stops import check_stop_strings, find_stop, held_back


class TextStream:
    """The text of new tokens, given out piece by piece as it becomes final.

    Each step decodes only a short window: the text of `ids[prefix:]` minus that of `ids[prefix:read]`
    (sentencepiece drops the leading space of whatever it decodes first, so both sides lose the same
    one). `context`: ids the new tokens continue (a completion's prompt tail), so the first new word
    keeps its leading space. A byte piece that ends mid-character waits for the rest.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop_strings: Sequence[str] = (),
                 context: Sequence[int] = ()):
        self.decode = decode
        self.stops = check_stop_strings(stop_strings)
        self.ids: list[int] = list(context)
        self._prefix, self._read = 0, len(self.ids)
        self.text = ""      # decoded so far (whole characters)
        self.sent = 0       # characters of `text` given out
        self.stopped = False

    def add(self, token: int) -> str:
        """Append one token; returns the text that became safe to show (possibly ''). Once a stop string
        is complete, `stopped` is set, the text ends before it and later tokens are ignored."""
        if self.stopped:
            return ""
        self.ids.append(int(token))
        before = self.decode(self.ids[self._prefix:self._read])
        after = self.decode(self.ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
        if self.stops:
            cut = find_stop(self.text[self.sent:], self.stops)
            if cut is not None:
                self.text, self.stopped = self.text[:self.sent + cut], True
                return self._give(len(self.text))
            return self._give(len(self.text) - held_back(self.text[self.sent:], self.stops))
        return self._give(len(self.text))

    def finish(self) -> str:
        """The rest (held-back text, an unfinished character), when generation ends without a stop string."""
        if not self.stopped and self._read < len(self.ids):
            tail = self.decode(self.ids[self._prefix:])
            self.text += tail[len(self.decode(self.ids[self._prefix:self._read])):]
            self._read = len(self.ids)
        return self._give(len(self.text))

    def _give(self, end: int) -> str:
        piece = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return piece


class TokenTexts:
    """Each token's own string, byte values and character offset, as `TextStream` decodes them: a token's
    string is the text it adds after the tokens before it (sentencepiece's leading space of the first
    word dropped as in the text; a special token adds ""). A byte-fallback piece past ASCII is one byte of
    a character, not text: its string is `bytes:\\xNN` (as OpenAI shows such tokens) and the character
    appears in the text when its last byte arrives. `offset` is the length of the text so far.

    `tok` needs decode, is_byte and id_to_piece (jaxllm's Tokenizer). `context`: ids the tokens continue.
    """

    def __init__(self, tok, context: Sequence[int] = ()):
        self.tok = tok
        self.ids: list[int] = list(context)
        self._prefix, self._read = 0, len(self.ids)
        self._before: str | None = None
        self.text = ""

    @property
    def offset(self) -> int:
        return len(self.text)

    def _byte(self, token: int) -> int | None:
        if not self.tok.is_byte(token):
            return None
        return int(self.tok.id_to_piece(token)[3:5], 16)

    def _added(self, token: int) -> str | None:
        """The new text if `token` came next, or None while a character is unfinished."""
        if self._before is None:
            self._before = self.tok.decode(self.ids[self._prefix:self._read])
        after = self.tok.decode(self.ids[self._prefix:] + [int(token)])
        if after.endswith("\ufffd") or len(after) < len(self._before):
            return None
        return after[len(self._before):]

    def string(self, token: int) -> str:
        """The string of `token` if it came next (an alternative at this position)."""
        byte = self._byte(token)
        if byte is not None and byte >= 0x80:
            return f"bytes:\\x{byte:02x}"
        return self._added(token) or ""

    def token_bytes(self, token: int, string: str) -> list[int]:
        byte = self._byte(token)
        return [byte] if byte is not None else list(string.encode("utf-8"))

    def add(self, token: int) -> tuple[str, list[int], int]:
        """Append `token`: (its string, its bytes, the text's length before it)."""
        offset, string = self.offset, self.string(token)
        added = self._added(token)
        self.ids.append(int(token))
        if added is not None:
            self.text += added
            self._prefix, self._read, self._before = self._read, len(self.ids), None
        return string, self.token_bytes(token, string), offset
