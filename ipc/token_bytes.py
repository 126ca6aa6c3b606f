"""The bytes each token id stands for, computed the same way wherever it is needed.

The gateway shows them in logprobs (`bytes`); the worker hands the whole vocabulary to the
grammar matcher (xgrammar), which matches grammars byte by byte. Three vocabularies:
GPT-2 byte-level BPE (each byte drawn as a printable character), SentencePiece with byte
fallback (`<0xNN>` tokens, `▁` for a space), and plain tokens. Special tokens map to b""
for the matcher, so a grammar never lets one through as text.
"""

from __future__ import annotations

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the printable character standing for a byte
    -> the byte (printable bytes stand for themselves, the rest are shifted past 255)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table, shift = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + shift)] = b
            shift += 1
    return table


BYTE_LEVEL_DECODER = _byte_level_decoder()


def is_byte_level(tokenizer: HFTokenizer) -> bool:
    return isinstance(tokenizer.decoder, decoders.ByteLevel)


def byte_fallback_ids(tokenizer: HFTokenizer) -> frozenset[int]:
    """Ids of `<0xNN>` tokens when the model falls back to bytes (SentencePiece style)."""
    if not getattr(tokenizer.model, "byte_fallback", False):
        return frozenset()
    ids = (tokenizer.token_to_id(f"<0x{b:02X}>") for b in range(256))
    return frozenset(i for i in ids if i is not None)


def special_ids(tokenizer: HFTokenizer) -> frozenset[int]:
    added = tokenizer.get_added_tokens_decoder()
    return frozenset(i for i, t in added.items() if t.special)


def token_bytes(token: str, *, special: bool, byte_level: bool, byte_fallback: bool) -> bytes:
    """The bytes of one token's vocabulary string (`id_to_token`)."""
    if special:
        return token.encode()
    if byte_level:
        return bytes(BYTE_LEVEL_DECODER.get(c, 0x3F) for c in token)
    if byte_fallback:
        return bytes([int(token[3:5], 16)])  # "<0xNN>"
    return token.replace("▁", " ").encode()


def vocab_bytes(tokenizer: HFTokenizer, vocab_size: int) -> list[bytes]:
    """Every id below `vocab_size` (the model's, which may pad the tokenizer's) -> its bytes;
    special tokens and ids the tokenizer lacks -> b"" (never text to a grammar)."""
    specials = special_ids(tokenizer)
    fallback = byte_fallback_ids(tokenizer)
    byte_level = is_byte_level(tokenizer)
    out = []
    for i in range(vocab_size):
        token = tokenizer.id_to_token(i)
        if token is None or i in specials:
            out.append(b"")
            continue
        out.append(
            token_bytes(token, special=False, byte_level=byte_level, byte_fallback=i in fallback)
        )
    return out
