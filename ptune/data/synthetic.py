"""Small synthetic tasks generated from a seed: the code paths of real tasks, no files."""

from __future__ import annotations

import numpy as np

POSITIVE = ("good", "great", "superb", "lovely", "fine", "nice")
NEGATIVE = ("awful", "poor", "dull", "nasty", "boring", "weak")
FILLER = ("the", "movie", "was", "plot", "and", "acting", "really", "quite", "film", "story", "a", "very")


def sentiment_sentences(n: int, seed: int) -> list[dict]:
    """`n` sentences of filler words with one or two polarity words; label 1 = positive."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        label = int(rng.integers(2))
        words = list(rng.choice(FILLER, size=int(rng.integers(4, 9))))
        for _ in range(int(rng.integers(1, 3))):
            words.insert(int(rng.integers(len(words) + 1)), str(rng.choice(POSITIVE if label else NEGATIVE)))
        out.append({"text": " ".join(words), "label": label})
    return out
