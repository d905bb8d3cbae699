"""LoHa (Hyeon-Woo et al., 2022, FedPara; PEFT's LoHaConfig): dW = (alpha / r) (W1a W1b) * (W2a W2b), the
Hadamard product of two rank-r products, which reaches rank r^2 with 2r(in + out) parameters.

PEFT's init: W2b = 0 (the identity), the others torch.nn.Linear's U(+-1/sqrt(fan_in)). Leaves
`hada_w1_a` (r, out), `hada_w1_b` (in, r) and the same for w2: PEFT's tensors transposed.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn

from ptune.models.ops import param
from ptune.models.sites import lora
from ptune.models.sites.base import register
from ptune.models.sites.delta import DeltaKind, shared_bank_spec


@dataclasses.dataclass(frozen=True)
class LoHa:
    rank: int
    alpha: float
    targets: str       # regex over module paths (see targets_regex)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoHaKind(DeltaKind):
    name, spec, leaves = "loha", LoHa, r"/hada_w[12]_[ab]$"
    defaults = lora.KIND.defaults          # PEFT's LoHa targets are LoRA's
    paddable = {"hada_w1_a": 0, "hada_w1_b": 1, "hada_w2_a": 0, "hada_w2_b": 1}   # rank: zero rows/columns
    peft_type = "LOHA"
    # init_weights and use_effective_conv2d (convolutions only) change nothing in a trained adapter of linear layers.
    peft_options = frozenset({"r", "alpha", "init_weights", "use_effective_conv2d"})
    peft_names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    scaled_leaves = ("hada_w1_a",)

    def create(self, spec: LoHa, layer, features_in: int) -> dict:
        r, (axis_in, axis_out), uniform = spec.rank, layer.axes, lora.lora_a_init
        shapes = {"hada_w1_a": ((r, layer.features), (None, axis_out), uniform),
                  "hada_w1_b": ((features_in, r), (axis_in, None), uniform),
                  "hada_w2_a": ((r, layer.features), (None, axis_out), uniform),
                  "hada_w2_b": ((features_in, r), (axis_in, None), nn.initializers.zeros)}
        return {name: param(layer, name, init, shape, axes) for name, (shape, axes, init) in shapes.items()}

    def delta(self, spec: LoHa, w):
        return spec.scale * (w["hada_w1_b"] @ w["hada_w1_a"]) * (w["hada_w2_b"] @ w["hada_w2_a"])

    def peft_config(self, spec: LoHa) -> dict:
        return dict(r=spec.rank, alpha=spec.alpha, rank_dropout=0.0, module_dropout=0.0)

    def options(self, config: dict) -> dict:
        return dict(rank=config.get("r", 8), alpha=config.get("alpha", 8))   # PEFT's defaults

    def bank_spec(self, specs):
        """The largest rank (zero-padded, exact), the union of targets and scale 1 (see `bank_leaf`)."""
        rank = max(s.rank for s in specs.values() if s is not None)
        return shared_bank_spec(self.name, specs, (), rank=rank, alpha=float(rank))


KIND = register(LoHaKind())
