"""Tokenizers behind one small interface: `encode(text) -> ids` without special tokens, `decode`,
the special ids as attributes (`pad_id`, `eos_id`, and `prefix_ids`/`suffix_ids`: what goes around a
sequence), a conversation cut into chat-template pieces, and a fingerprint (what cached encodings are
keyed by). HF tokenizers arrive with real models; `ByteTokenizer` needs no files and serves tests and
synthetic tasks."""

from __future__ import annotations

import dataclasses
import hashlib

from ptune.errors import UserError

ROLES = ("system", "user", "assistant", "tool")


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 bytes 0-255, then pad, bos, eos, cls (vocab 260). It stands in for a model of any
    `family`, which decides what goes around a sequence (`for_family` sets it)."""
    pad_id: int = 256
    bos_id: int = 257
    eos_id: int = 258
    cls_id: int = 259
    vocab_size: int = 260
    fingerprint: str = "bytes"
    family: str = "gpt2"

    @property
    def prefix_ids(self) -> list[int]:
        """The ids before a sequence: BERT's [CLS] (cls_id), decoders' BOS."""
        return [self.cls_id] if self.family == "bert" else [self.bos_id]

    @property
    def suffix_ids(self) -> list[int]:
        """The ids after a sequence: BERT's [SEP] (eos_id); none for decoders."""
        return [self.eos_id] if self.family == "bert" else []

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def chat_pieces(self, messages) -> list[tuple[str, bool]]:
        """ChatML-style text (the byte vocabulary has no special tokens): see `chat_pieces`."""
        def render(turns, add_generation_prompt=False):
            text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in turns)
            return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")
        return chat_pieces(render, messages)


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
        self.prefix_ids, self.suffix_ids = full[:start], full[start + len(plain):]
        backend = getattr(tokenizer, "backend_tokenizer", None)
        identity = (backend.to_str() if backend is not None else repr(tokenizer)) + str(tokenizer.chat_template)
        self.fingerprint = hashlib.sha256(identity.encode()).hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def chat_pieces(self, messages) -> list[tuple[str, bool]]:
        """The tokenizer's own chat template, cut into turns (see `chat_pieces`)."""
        if not self.tokenizer.chat_template:
            raise UserError(f"the tokenizer of {self.tokenizer.name_or_path or 'this model'} has no chat template, "
                            "so chat data cannot be rendered; use a chat model or the generate kind")
        render = lambda turns, add_generation_prompt=False: self.tokenizer.apply_chat_template(
            turns, tokenize=False, add_generation_prompt=add_generation_prompt) if turns else ""
        return chat_pieces(render, messages)


def for_family(tokenizer, family: str):
    """`tokenizer` for a model of `family`: the byte tokenizer, which serves every family, takes that
    family's special ids; a model's own tokenizer already has them."""
    if isinstance(tokenizer, ByteTokenizer) and tokenizer.family != family:
        return dataclasses.replace(tokenizer, family=family)
    return tokenizer


def chat_pieces(render, messages) -> list[tuple[str, bool]]:
    """(text, is an assistant turn) pieces whose concatenation is `render(messages)`.

    An assistant turn's piece is what rendering it adds after the generation prompt (its text and
    end-of-turn tokens); everything else (system and user turns, the assistant header) is context.
    Needs a template whose rendering of a conversation starts with the rendering of its first turns,
    as chat templates do; one that does not is refused."""
    pieces, done = [], ""
    for i, message in enumerate(messages):
        cuts = [(render(messages[:i], add_generation_prompt=True), False)] if message["role"] == "assistant" else []
        cuts.append((render(messages[: i + 1]), message["role"] == "assistant"))
        for text, predicted in cuts:
            if not text.startswith(done):
                raise UserError(f"the chat template's rendering of turns 0..{i} does not start with that of the "
                                "turns before, so the assistant turns cannot be told apart; render the data "
                                "yourself and use the generate kind")
            pieces.append((text[len(done):], predicted))
            done = text
    return [(text, predicted) for text, predicted in pieces if text]
