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
