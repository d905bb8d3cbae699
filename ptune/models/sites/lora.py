"""LoRA (Hu et al., 2021): x @ W + (alpha / r) (x A) B on the target layers, B = 0 at init.

`rslora` scales by alpha / sqrt(r) (Kalajdzievski, 2023). Leaves `lora_a` (in, r) and `lora_b`
(r, out) beside the layer's kernel; PEFT's lora_A/lora_B are their transposes.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import numpy as np

from ptune.models.ops import matmul, param
from ptune.models.sites.base import SiteKind, register, union_regex

# PEFT initialises LoRA A like torch.nn.Linear: kaiming_uniform(a=sqrt(5)) = U(±1/sqrt(fan_in)).
lora_a_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
PEFT_LEAVES = {"lora_A.weight": "lora_a", "lora_B.weight": "lora_b"}


@dataclasses.dataclass(frozen=True)
class LoRA:
    rank: int
    alpha: float
    targets: str       # regex over module paths (see targets_regex)
    rslora: bool = False
    dropout: float = 0.0

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


class LoRAKind(SiteKind):
    name, spec, leaves, wraps, sharding = "lora", LoRA, r"/lora_[ab]$", "product", "replicated"
    defaults = {"gpt2": {"targets": ["c_attn"]}, "llama": {"targets": ["q_proj", "v_proj"]},
                "bert": {"targets": ["query", "value"]}}
    paddable = {"lora_a": 1, "lora_b": 0}   # rank: A's extra columns and B's extra rows are 0
    peft_type = "LORA"
    peft_options = frozenset({"r", "lora_alpha", "use_rslora", "lora_dropout", "bias", "init_lora_weights",
                              "megatron_core", "qalora_group_size"})

    def linear(self, spec: LoRA, call, x, inner):
        layer, dt = call.layer, call.layer.dtype
        y = inner(x)
        a = param(layer, "lora_a", lora_a_init, (x.shape[-1], spec.rank), (layer.axes[0], None))
        b = param(layer, "lora_b", nn.initializers.zeros, (spec.rank, layer.features), (None, layer.axes[1]))
        h = nn.Dropout(spec.dropout)(x, deterministic=call.deterministic)
        return y + matmul(matmul(h, a, dt), b * spec.scale, dt)

    def merge(self, spec: LoRA, layer: dict, path: str) -> dict:
        """W + scale * A B, both (in, out)."""
        out = {k: v for k, v in layer.items() if k not in ("lora_a", "lora_b")}
        out["kernel"] = layer["kernel"] + spec.scale * (layer["lora_a"] @ layer["lora_b"])
        return out

    def bank_spec(self, specs):
        """Max rank, union of targets, and scale 1: `bank_leaf` folds each task's alpha/r into B."""
        present = [s for s in specs.values() if s is not None]
        rank = max(s.rank for s in present)
        return LoRA(rank, float(rank), union_regex([s.targets for s in present]))

    def bank_leaf(self, spec: LoRA, bank_spec, path: str, value):
        return value * np.asarray(spec.scale, value.dtype) if path.endswith("/lora_b") else value

    def peft_export(self, spec: LoRA, flat: dict, ctx):
        tensors = {ctx.peft_key(p, PEFT_LEAVES): np.asarray(x).T            # PEFT's nn.Linear: (out, in)
                   for p, x in flat.items() if self.owns(p)}
        targeted = [m for m in ctx.layers if f"{m}/lora_a" in flat]
        config = dict(ctx.tuner_config(targeted), r=spec.rank, lora_alpha=spec.alpha, use_rslora=spec.rslora,
                      lora_dropout=spec.dropout, bias="none")
        return config, tensors

    def peft_load(self, config: dict, tensors: dict, ctx):
        origin = {p: (key, x.T) for p, (key, x) in ctx.layer_leaves(self.name, tensors, PEFT_LEAVES).items()}
        targeted = sorted({p.rpartition("/")[0] for p in origin})
        # r and lora_alpha default to PEFT's own defaults when a config leaves them out.
        options = dict(rank=config.get("r", 8), alpha=config.get("lora_alpha", 8), targets=ctx.names(targeted),
                       rslora=bool(config.get("use_rslora")), dropout=config.get("lora_dropout") or 0.0)
        return "lora", options, origin


KIND = register(LoRAKind())
