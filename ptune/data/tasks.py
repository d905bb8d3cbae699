"""Tasks: named data sets with splits, a kind, and a default template.

A task builder takes options and returns a `Task`; `get(name, **options)` looks it
up. Real data sets register here too (see the real-data issue)."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable

from ptune.data import synthetic
from ptune.data.templates import Template

KINDS = ("classify", "lm")


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    kind: str                         # classify | lm
    splits: dict[str, list[dict]]     # examples: {"text": str, "label": int} ("label" for classify)
    template: Template = Template()
    num_classes: int = 0

    def split(self, name: str) -> list[dict]:
        if name not in self.splits:
            raise ValueError(f"task {self.name!r} has no split {name!r}; splits: {sorted(self.splits)}")
        examples = self.splits[name]
        if not examples:
            raise ValueError(f"task {self.name!r}: split {name!r} is empty")
        if self.kind == "classify":
            bad = next((i for i, e in enumerate(examples) if e.get("label") not in range(self.num_classes)), None)
            if bad is not None:
                raise ValueError(f"task {self.name!r}: split {name!r} example {bad} has label "
                                 f"{examples[bad].get('label')!r}, outside 0..{self.num_classes - 1}")
        return examples


def synthetic_sentiment(n_train: int = 512, n_eval: int = 256, seed: int = 0) -> Task:
    """Binary sentiment over generated sentences; the template asks the LM for 'good'/'bad'."""
    make = lambda n, s: synthetic.sentiment_sentences(n, s)
    return Task("synthetic_sentiment", "classify",
                {"train": make(n_train, seed), "validation": make(n_eval, seed + 1), "test": make(n_eval, seed + 2)},
                Template("{text}. Overall it was ", ("bad", "good")), num_classes=2)


def synthetic_lm(n_train: int = 512, n_eval: int = 128, seed: int = 0) -> Task:
    """Language modelling on the same generated sentences."""
    strip = lambda xs: [{"text": x["text"]} for x in xs]
    return Task("synthetic_lm", "lm",
                {"train": strip(synthetic.sentiment_sentences(n_train, seed)),
                 "validation": strip(synthetic.sentiment_sentences(n_eval, seed + 1))})


REGISTRY: dict[str, Callable[..., Task]] = {"synthetic_sentiment": synthetic_sentiment, "synthetic_lm": synthetic_lm}


def get(name: str, **options) -> Task:
    if name not in REGISTRY:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(REGISTRY)}")
    allowed = list(inspect.signature(REGISTRY[name]).parameters)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"task {name!r} has no option(s) {unknown}; its options are {allowed}")
    return REGISTRY[name](**options)
