"""Site specs: what a method asks the model to grow.

A model is built from a `ModelConfig` and a `Sites`. Each field of `Sites` is one
kind of site; `None` means absent. Sites are identity at initialisation (LoRA
``b = 0``, adapter up-projection 0, IA3 scales 1; prompts and prefixes are
extra context), so adding them never changes a pretrained model's outputs by
itself — except prompt and prefix, which add context by design.

Linear-layer sites (LoRA, IA3) choose their layers with ``targets``: a regex
``re.search``-ed against the module path (``transformer/h_0/attn/c_attn``), or a
list of module names matched as path suffixes, like PEFT's ``target_modules``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence


def targets_regex(targets: str | Sequence[str]) -> str:
    """A regex from PEFT-style `target_modules`: a regex string, or names matched as suffixes."""
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as e:
            raise ValueError(f"targets {targets!r} is not a valid regex ({e}); fix it, or give a list of module "
                             "names such as ['c_attn']") from None
        return targets
    return r"(^|/)(" + "|".join(re.escape(t).replace(r"\.", "/") for t in targets) + r")$"


@dataclasses.dataclass(frozen=True)
class LoRA:
    rank: int
    alpha: float
    targets: str
    rslora: bool = False
    dropout: float = 0.0

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


@dataclasses.dataclass(frozen=True)
class IA3:
    targets: str       # layers whose output is scaled
    feedforward: str   # among those, layers whose *input* is scaled instead (PEFT semantics)


@dataclasses.dataclass(frozen=True)
class Adapter:
    size: int
    placement: str = "houlsby"   # houlsby: after attention and MLP; pfeiffer: after MLP
    activation: str = "relu"

    @property
    def after_attention(self) -> bool:
        return self.placement == "houlsby"


@dataclasses.dataclass(frozen=True)
class Prefix:
    length: int
    hidden: int | None = None   # Li & Liang's MLP width; None stores keys/values directly


@dataclasses.dataclass(frozen=True)
class Prompt:
    length: int


@dataclasses.dataclass(frozen=True)
class Sites:
    lora: LoRA | None = None
    ia3: IA3 | None = None
    adapter: Adapter | None = None
    prefix: Prefix | None = None
    prompt: Prompt | None = None

    def union(self, other: "Sites") -> "Sites":
        """Both methods' sites; the same kind asked for twice must agree."""
        merged = {}
        for f in dataclasses.fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if a is not None and b is not None and a != b:
                raise ValueError(f"composed methods ask for different {f.name} sites: "
                                 f"{a} vs {b}; give them one {f.name} spec")
            merged[f.name] = a if a is not None else b
        return Sites(**merged)

    @property
    def extra_positions(self) -> int:
        """Context taken by prompt and prefix tokens."""
        return (self.prompt.length if self.prompt else 0) + (self.prefix.length if self.prefix else 0)
