"""LoKr (Yeh et al., 2024, LyCORIS; PEFT's LoKrConfig): dW = (alpha / r) W1 (x) W2, a Kronecker product.

Each side of a layer is factored as PEFT does (`factorization`: in = c d, out = a b, near the square
root or with `decompose_factor` as the smaller factor), W1 is (a, c) and W2 (b, d). W2 is the
product of two rank-r factors when r < max(b, d) / 2, else full; W1 likewise with `decompose_both`.
PEFT's init: W1 (or W1a) = 0, the identity; the others torch.nn.Linear's U(+-1/sqrt(fan_in)).
Leaves `lokr_w1` (c, a) or `lokr_w1_a` (r, a) and `lokr_w1_b` (c, r), the same for w2: PEFT's
tensors transposed, so dW (in, out) = W1 (x) W2 here too.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from ptune.models.ops import param
from ptune.models.sites import loha, lora
from ptune.models.sites.base import register
from ptune.models.sites.delta import DeltaKind, shared_bank_spec


@dataclasses.dataclass(frozen=True)
class LoKr:
    rank: int
    alpha: float
    targets: str                 # regex over module paths (see targets_regex)
    decompose_both: bool = False
    decompose_factor: int = -1   # -1: factors near the square root

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def factors(self, features_in: int, features_out: int) -> dict:
        """{"w1": ((c, a), full), "w2": ((d, b), full)}: each Kronecker factor's (in, out) shape and whether
        it is one matrix (else two rank-r factors), as PEFT decides for a linear layer."""
        (c, d), (a, b) = (factorization(n, self.decompose_factor) for n in (features_in, features_out))
        return {"w1": ((c, a), not (self.decompose_both and self.rank < max(a, c) / 2)),
                "w2": ((d, b), not self.rank < max(b, d) / 2)}


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n), m <= n, m * n = dimension: PEFT's (lokr.layer.factorization), with m = `factor` when it
    divides, else the divisor pair of smallest sum with m at most `factor` (-1: no bound)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    factor = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        new_m = next(k for k in range(m + 1, dimension + 1) if dimension % k == 0)
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > factor:
            break
        m, n = new_m, new_n
    return min(m, n), max(m, n)


class LoKrKind(DeltaKind):
    name, spec, leaves = "lokr", LoKr, r"/lokr_w[12](_[ab])?$"
    defaults = lora.KIND.defaults          # PEFT's LoKr targets are LoRA's
    peft_type = "LOKR"
    # Init schemes and use_effective_conv2d (convolutions only) change nothing in a trained adapter of linear layers.
    peft_options = frozenset({"r", "alpha", "decompose_both", "decompose_factor", "init_weights",
                              "use_effective_conv2d", "rank_dropout_scale"})
    peft_names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
    scaled_leaves = ("lokr_w1", "lokr_w1_a")

    def create(self, spec: LoKr, layer, features_in: int) -> dict:
        uniform, leaves = lora.lora_a_init, {}
        for side, ((fan_in, fan_out), full) in spec.factors(features_in, layer.features).items():
            first = nn.initializers.zeros if side == "w1" else uniform   # W1 = 0: the identity
            r, name = spec.rank, f"lokr_{side}"
            shapes = ({name: ((fan_in, fan_out), first)} if full else
                      {f"{name}_a": ((r, fan_out), first), f"{name}_b": ((fan_in, r), uniform)})
            leaves.update({n: param(layer, n, init, shape, (None, None)) for n, (shape, init) in shapes.items()})
        return leaves

    def delta(self, spec: LoKr, w):
        w1, w2 = (w[f"lokr_{s}"] if f"lokr_{s}" in w else w[f"lokr_{s}_b"] @ w[f"lokr_{s}_a"] for s in ("w1", "w2"))
        return spec.scale * jnp.kron(w1, w2)

    def peft_config(self, spec: LoKr) -> dict:
        return dict(r=spec.rank, alpha=spec.alpha, decompose_both=spec.decompose_both,
                    decompose_factor=spec.decompose_factor, rank_dropout=0.0, module_dropout=0.0)

    def options(self, config: dict) -> dict:
        return dict(loha.KIND.options(config), decompose_both=bool(config.get("decompose_both")),   # r, alpha as LoHa's
                    decompose_factor=config.get("decompose_factor", -1))

    def bank_spec(self, specs):
        """One rank and factoring for all tasks (they decide which factors are full), the union of
        targets and scale 1 (see `bank_leaf`)."""
        rank = next(s.rank for s in specs.values() if s is not None)
        return shared_bank_spec(self.name, specs, ("rank", "decompose_both", "decompose_factor"), alpha=float(rank))


KIND = register(LoKrKind())
