"""Decode token windows without broken characters, with per-token strings that add up to the text.

Byte-level BPE tokens can split one UTF-8 character (CJK, emoji, math symbols) across tokens, so
decoding tokens one at a time shows "\ufffd". Here each token is mapped to its raw bytes once, a window's
bytes are decoded incrementally, and each token's string is the characters *completed* by its bytes:
``"".join(pieces) == text`` always. Continuation bytes cut off at the start of a window and an
unfinished character at its end are dropped rather than shown as replacement characters.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from typing import Any


def byte_level_alphabet() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2 / Qwen): printable character -> the byte it stands for."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            mapping[chr(256 + extra)] = b
            extra += 1
    return mapping


class TokenRenderer:
    """Token ids -> (text, per-token strings) for one tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        alphabet = byte_level_alphabet()
        added = {int(i) for i in getattr(tokenizer, "added_tokens_decoder", {})}
        size = len(tokenizer)
        self.bytes: list[bytes] = []
        for i, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(size)))):
            if token is None:
                self.bytes.append(b"")
            elif i in added:
                self.bytes.append(token.encode("utf-8"))
            elif all(c in alphabet for c in token):
                self.bytes.append(bytes(alphabet[c] for c in token))
            else:  # not byte-level (e.g. sentencepiece): the tokenizer's own decoding
                self.bytes.append(tokenizer.decode([i]).encode("utf-8"))

    def token_bytes(self, token_id: int) -> bytes:
        return self.bytes[token_id] if 0 <= token_id < len(self.bytes) else b""

    def render(self, ids: Sequence[int]) -> tuple[str, list[str]]:
        """``(text, pieces)`` with ``len(pieces) == len(ids)`` and ``"".join(pieces) == text``."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pieces, leading = [], True
        for token_id in ids:
            raw = self.token_bytes(int(token_id))
            if leading:  # continuation bytes of a character that started before the window
                raw = raw.lstrip(bytes(range(0x80, 0xC0)))
                leading = not raw
            pieces.append(decoder.decode(raw))
        return "".join(pieces), pieces
