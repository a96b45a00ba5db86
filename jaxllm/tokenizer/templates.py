"""Chat templates as data: each turns a conversation into token ids plus a loss mask (assistant
tokens only) for SFT, and into a prompt for generation.

messages: [{"role": "system"|"user"|"assistant", "content": str}], an optional system message first,
then user/assistant alternating.
"""
from __future__ import annotations

import dataclasses

from jaxllm.config import closest
from jaxllm.tokenizer.errors import TokenizerError
from jaxllm.tokenizer.sp import Tokenizer


def _turns(messages, *, ends_with: str) -> tuple[str | None, list[tuple[str, str | None]]]:
    """(system, [(user, assistant or None)]), after checking roles alternate and nothing is empty."""
    if not messages:
        raise TokenizerError("conversation is empty")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise TokenizerError(f"message {i}: expected {{'role': ..., 'content': ...}}, got {m!r:.80}")
    system, first = None, 0
    if messages[0]["role"] == "system":
        system, messages, first = messages[0]["content"], messages[1:], 1
        if not isinstance(system, str):
            raise TokenizerError(f"message 0 (system): content must be a string, got {type(system).__name__}")
        system = system if system.strip() else None  # an empty system prompt is no system prompt
    for i, m in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise TokenizerError(f"message {first + i}: role '{m['role']}' where '{expected}' was expected "
                                 f"(roles must alternate user/assistant after an optional system)")
        if not isinstance(m["content"], str) or not m["content"].strip():
            raise TokenizerError(f"message {first + i} ({expected}) has empty content")
    if not messages or messages[-1]["role"] != ends_with:
        raise TokenizerError(f"conversation must end with a{'n' if ends_with == 'assistant' else ''} "
                             f"{ends_with} message")
    users = [m["content"] for m in messages[0::2]]
    replies = [m["content"] for m in messages[1::2]] + [None] * (len(users) - len(messages[1::2]))
    return system, list(zip(users, replies))


def _encode_marked(tok: Tokenizer, text: str, trainable: list[tuple[int, int]]):
    """Encode `text` in one go; a piece is trainable when it covers any byte of a trainable char span."""
    ids, offsets = tok.encode_with_offsets(text)
    spans = [(len(text[:a].encode()), len(text[:b].encode())) for a, b in trainable]
    mask = [int(any(begin < hi and end > lo for lo, hi in spans)) for begin, end in offsets]
    # Byte-fallback pieces of one character are zero-width but the last: they share its fate.
    for i in range(len(ids) - 2, -1, -1):
        if offsets[i][0] == offsets[i][1]:
            mask[i] = mask[i + 1]
    return ids, mask


LLAMA2_TAGS = ("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>")


def _refuse_llama2_tags(messages) -> None:
    """Meta's chat_completion refuses a dialog whose content holds a chat tag (spec §3.2): such text would
    forge turn or system boundaries."""
    for i, m in enumerate(messages):
        for tag in LLAMA2_TAGS:
            if tag in m["content"]:
                raise TokenizerError(f"message {i} ({m['role']}) contains the Llama 2 chat tag {tag!r}; "
                                     f"llama2-chat refuses {', '.join(LLAMA2_TAGS)} inside message content")


BAICHUAN_USER_ID, BAICHUAN_ASSISTANT_ID = 195, 196


def _check_baichuan_markers(tok: Tokenizer) -> None:
    """Baichuan reserves ids 195/196 for the chat roles; a tokenizer with text or bytes there would make
    the markers indistinguishable from text."""
    for i in (BAICHUAN_USER_ID, BAICHUAN_ASSISTANT_ID):
        if i >= tok.vocab_size or tok.is_byte(i):
            what = f"byte piece '{tok.id_to_piece(i)}'" if i < tok.vocab_size else "no piece"
            raise TokenizerError(f"baichuan2-chat marks user/assistant turns with ids 195/196, but {tok.path} has "
                                 f"{what} at id {i}: use a Baichuan tokenizer, or train one with "
                                 f"`jaxllm tokenizer train --reserved 200`")


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    name: str

    def render(self, tok: Tokenizer, messages) -> tuple[list[int], list[int]]:
        """A full conversation (ending with an assistant reply) → (ids, loss_mask): mask[i] = 1 where
        ids[i] is learned (predicted from position i - 1)."""
        ids, mask, _, _ = self._render(tok, messages, "assistant")
        return ids, mask

    def render_labels(self, tok: Tokenizer, messages) -> tuple[list[int], list[int], list[int]]:
        """(ids, labels, mask) for SFT: labels[i] is the token position i - 1 is trained to predict where
        mask[i] = 1. labels == ids except at Baichuan 2's round boundaries, where the official labels
        train EOS although the input holds the next user id 195 (spec §6.6)."""
        ids, _, labels, mask = self._render(tok, messages, "assistant")
        return ids, labels, mask

    def prompt(self, tok: Tokenizer, messages) -> list[int]:
        """History ending with a user message → ids after which the assistant reply follows."""
        return self._render(tok, messages, "user")[0]

    def _render(self, tok, messages, ends_with):
        system, turns = _turns(messages, ends_with=ends_with)
        if self.name == "llama2-chat":
            _refuse_llama2_tags(messages)
        out = getattr(self, f"_{self.name.replace('-', '_')}")(tok, system, turns)
        return out if len(out) == 4 else (*out, list(out[0]), list(out[1]))  # (ids, mask, labels, label mask)

    def stop_ids(self, tok: Tokenizer) -> list[int]:
        """Ids that end an assistant reply: EOS, and the marker of the next user turn where it is one token
        (Ziya's `<human>` when the tokenizer has it as a piece or added token, Baichuan's 195)."""
        stops = [tok.eos_id]
        if self.name == "ziya" and tok.has_piece("<human>"):
            stops.append(tok.piece_to_id("<human>"))
        user = BAICHUAN_USER_ID
        if self.name == "baichuan2-chat" and user < tok.vocab_size and not tok.is_byte(user):
            stops.append(user)
        return stops

    # Llama 2 chat (spec §3.2, Meta's `chat_completion`): the system prompt joins the first user message
    # as "<<SYS>>\n{system}\n<</SYS>>\n\n{user}", stripped as a whole; each completed pair is
    # [BOS] + SP("[INST] {user} [/INST] {answer} ") + [EOS]; an open turn is [BOS] + SP("[INST] {user} [/INST]").
    def _llama2_chat(self, tok, system, turns):
        ids, mask = [], []
        for i, (user, answer) in enumerate(turns):
            if i == 0 and system is not None:
                user = f"<<SYS>>\n{system}\n<</SYS>>\n\n{user}"
            head = f"[INST] {user.strip()} [/INST]"
            if answer is None:
                ids += [tok.bos_id] + tok.encode(head)
                mask += [0] * (len(ids) - len(mask))
                continue
            text = f"{head} {answer.strip()} "
            piece_ids, piece_mask = _encode_marked(tok, text, [(len(head), len(text))])
            ids += [tok.bos_id] + piece_ids + [tok.eos_id]
            mask += [0] + piece_mask + [1]
        return ids, mask

    # Baichuan 2 chat (spec §6.6): SP(system) + Σ [195] + SP(user) + [196] + SP(reply); no BOS, no EOS
    # between rounds; SFT ends the conversation with EOS. fine-tune.py labels each later round's 195 with
    # EOS, so the last token of a reply learns to predict EOS although the input goes on with 195: `labels`
    # say so (mask 1 there), while `mask` over the input ids leaves 195 itself unlearned.
    def _baichuan2_chat(self, tok, system, turns):
        _check_baichuan_markers(tok)
        ids = tok.encode(system) if system else []
        mask = [0] * len(ids)
        boundaries = []  # positions of 195 that follow a reply
        for user, answer in turns:
            if mask and mask[-1]:
                boundaries.append(len(ids))
            piece = [BAICHUAN_USER_ID] + tok.encode(user) + [BAICHUAN_ASSISTANT_ID]
            ids += piece
            mask += [0] * len(piece)
            if answer is not None:
                reply = tok.encode(answer)
                ids += reply
                mask += [1] * len(reply)
        if turns[-1][1] is not None:
            ids.append(tok.eos_id)
            mask.append(1)
        labels, label_mask = list(ids), list(mask)
        for k in boundaries:
            labels[k], label_mask[k] = tok.eos_id, 1
        return ids, mask, labels, label_mask

    # Ziya (spec §8, Fengshenbang's finetune_ziya_llama.py): [BOS] (as its tokenizer adds one), then per
    # turn enc("<human>:{query}\n<bot>:") + enc(output) + [EOS], each part encoded on its own; loss on
    # output + EOS. `<human>` / `<bot>` are single ids where the tokenizer has them as added tokens (39408 /
    # 39409 in Ziya's). Ziya has no system role: a system prompt is plain text before the first turn.
    def _ziya(self, tok, system, turns):
        ids = [tok.bos_id] if tok.add_bos else []
        mask = [0] * len(ids)
        if system:
            piece = tok.encode(system.strip() + "\n")
            ids += piece
            mask += [0] * len(piece)
        for user, answer in turns:
            head = tok.encode("<human>:" + user.strip() + "\n<bot>:")
            ids += head
            mask += [0] * len(head)
            if answer is not None:
                reply = tok.encode(answer.strip()) + [tok.eos_id]
                ids += reply
                mask += [1] * len(reply)
        return ids, mask

    # Plain: [BOS] (unless the tokenizer's files say add_bos_token false) system "\n\n", then
    # "User: …\n\nAssistant: " reply EOS per turn.
    def _plain(self, tok, system, turns):
        ids = [tok.bos_id] if tok.add_bos else []
        mask = [0] * len(ids)
        if system:
            piece = tok.encode(system.strip() + "\n\n")
            ids += piece
            mask += [0] * len(piece)
        for user, answer in turns:
            head = f"User: {user.strip()}\n\nAssistant:"
            if answer is None:
                piece = tok.encode(head)
                ids += piece
                mask += [0] * len(piece)
                continue
            text = f"{head} {answer.strip()}"
            piece_ids, piece_mask = _encode_marked(tok, text, [(len(head), len(text))])
            ids += piece_ids + [tok.eos_id]
            mask += piece_mask + [1]
        return ids, mask


CHAT_TEMPLATES = {name: ChatTemplate(name) for name in ("llama2-chat", "baichuan2-chat", "ziya", "plain")}
_FAMILY_TEMPLATES = {"llama": "llama2-chat", "baichuan": "baichuan2-chat", "baichuan2": "baichuan2-chat",
                     "ziya": "ziya", "ctllm": "plain"}


def get_chat_template(name: str) -> ChatTemplate:
    if name not in CHAT_TEMPLATES:
        raise TokenizerError(f"unknown chat template '{name}'{closest(name, CHAT_TEMPLATES)}; "
                             f"known: {', '.join(CHAT_TEMPLATES)}")
    return CHAT_TEMPLATES[name]


def template_for_family(family: str) -> str:
    """The chat template a family's chat models were trained with (CT-LLM: plain)."""
    return _FAMILY_TEMPLATES.get(family, "plain")
