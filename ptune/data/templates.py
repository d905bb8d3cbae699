"""Prompt templates and verbalizers (manual prompts and the classification-by-LM objective)."""

from __future__ import annotations

import dataclasses

from ptune.errors import UserError


@dataclasses.dataclass(frozen=True)
class Template:
    """`text` holds one '{text}' field; `verbalizer` gives one word per class, whose first
    token the LM must predict after the rendered template. `single_token`: every word must be
    one token (user verbalizers); the shipped tasks' words are scored by their first token."""
    text: str = "{text}"
    verbalizer: tuple[str, ...] = ()
    single_token: bool = False

    def __post_init__(self):
        if self.text.count("{text}") != 1:
            raise UserError(f"template {self.text!r} must contain the '{{text}}' field exactly once")

    def parts(self) -> tuple[str, str]:
        before, after = self.text.split("{text}")
        return before, after

    def label_ids(self, tokenizer) -> list[int]:
        """The first token of each verbalizer word; two classes may not share it."""
        ids = []
        for word in self.verbalizer:
            tokens = tokenizer.encode(word)
            if not tokens:
                raise UserError(f"verbalizer word {word!r} encodes to no token")
            if self.single_token and len(tokens) > 1:
                pieces = [tokenizer.decode([t]) for t in tokens]
                raise UserError(f"verbalizer word {word!r} is {len(tokens)} tokens {pieces}, but the verbalizer "
                                "objective scores one token per class; choose a single-token word (often with a "
                                "leading space) in config.task.verbalizer, or use config.task.objective='head'")
            ids.append(tokens[0])
        if len(set(ids)) != len(ids):
            raise UserError(f"verbalizer {self.verbalizer} gives two classes the same first token {ids}; "
                            "choose words that start differently")
        return ids
