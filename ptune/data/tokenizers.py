"""Tokenizers behind one small interface: `encode(text) -> ids` without special tokens,
plus the ids a family puts around a sequence. HF tokenizers arrive with real models;
`ByteTokenizer` needs no files and serves tests and synthetic tasks."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 bytes 0-255, then pad, bos, eos, cls (vocab 260)."""
    pad_id: int = 256
    bos_id: int = 257
    eos_id: int = 258
    cls_id: int = 259
    vocab_size: int = 260

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def specials(self, family: str) -> tuple[list[int], list[int]]:
        """(ids before, ids after) a sequence: BERT's [CLS] ... [SEP], decoders' BOS."""
        return ([self.cls_id], [self.eos_id]) if family == "bert" else ([self.bos_id], [])


class HFTokenizer:
    """A transformers tokenizer behind ptune's interface."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        self.eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        # What the tokenizer itself puts around a text ([CLS] ... [SEP] for BERT, maybe BOS for decoders).
        plain = tokenizer.encode("a", add_special_tokens=False)
        full = tokenizer.encode("a")
        start = full.index(plain[0])
        self._specials = (full[:start], full[start + len(plain):])

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def specials(self, family: str) -> tuple[list[int], list[int]]:
        return self._specials
