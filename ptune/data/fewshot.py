"""Few-shot training sets: K examples per class, drawn deterministically from a seed.

LM-BFF (Gao et al. 2021) reports every few-shot result as the mean over the seeds
13, 21, 42, 87 and 100 (`SEEDS`); any integer works.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

import numpy as np

from ptune.errors import UserError

SEEDS = (13, 21, 42, 87, 100)


def few_shot(examples: Sequence[dict], k: int, seed: int, *, key: str | None = "label",
             label_names: Sequence[str] | None = None) -> list[dict]:
    """The first `k` examples of each class in the permutation `np.random.default_rng(seed)`
    draws over `examples`, returned in that permutation's order (classes interleaved).

    `key` is the field holding the class; `key=None` takes `k` examples in all. With
    `label_names`, classes are 0..len(label_names)-1 and a class with no example counts as
    having 0. A class with fewer than `k` examples is an error naming it and all counts."""
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise UserError(f"few_shot: k must be a positive integer, got {k!r}")
    order = np.random.default_rng(seed).permutation(len(examples))
    if key is None:
        if len(examples) < k:
            raise UserError(f"few_shot: k={k} examples requested but only {len(examples)} are available")
        return [examples[i] for i in order[:k]]
    counts = collections.Counter(e[key] for e in examples)
    classes = range(len(label_names)) if label_names is not None else sorted(counts)
    short = [c for c in classes if counts.get(c, 0) < k]
    if short:
        name = lambda c: f"{c} ({label_names[c]!r})" if label_names is not None else repr(c)
        listing = ", ".join(f"{name(c)}: {counts.get(c, 0)}" for c in classes)
        lacking = ", ".join(f"class {name(c)} has only {counts.get(c, 0)} examples" for c in short)
        raise UserError(f"few_shot: k={k} per class, but {lacking}; counts per class: {listing}")
    taken, out = collections.Counter(), []
    for i in order:
        c = examples[i][key]
        if taken[c] < k:
            taken[c] += 1
            out.append(examples[i])
    return out
