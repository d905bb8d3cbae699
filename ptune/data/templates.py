"""Prompt templates and verbalizers (manual prompts and the classification-by-LM objective)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Template:
    """`text` holds one '{text}' field; `verbalizer` gives one word per class, whose first
    token the LM must predict after the rendered template."""
    text: str = "{text}"
    verbalizer: tuple[str, ...] = ()

    def __post_init__(self):
        if self.text.count("{text}") != 1:
            raise ValueError(f"template {self.text!r} must contain the '{{text}}' field exactly once")

    def parts(self) -> tuple[str, str]:
        before, after = self.text.split("{text}")
        return before, after

    def label_ids(self, tokenizer) -> list[int]:
        """The first token of each verbalizer word; two classes may not share it."""
        ids = []
        for word in self.verbalizer:
            tokens = tokenizer.encode(word)
            if not tokens:
                raise ValueError(f"verbalizer word {word!r} encodes to no token")
            ids.append(tokens[0])
        if len(set(ids)) != len(ids):
            raise ValueError(f"verbalizer {self.verbalizer} gives two classes the same first token {ids}; "
                             "choose words that start differently")
        return ids
