"""LoRA (Hu et al., 2021): x @ W + (alpha / r) (x A) B on the target layers, B = 0 at init.

`rslora` scales by alpha / sqrt(r) (Kalajdzievski, 2023). Leaves `lora_a` (in, r) and `lora_b`
(r, out) beside the layer's kernel; PEFT's lora_A/lora_B are their transposes.

`from_base` (PiSSA, OLoRA: the method's `init` factorises the kernel into A0, B0 and starts A, B
there) keeps frozen copies `lora_a0`, `lora_b0` and subtracts them: the layer computes
x @ W + scale (x [A, A0]) [B; -B0], a plain rank-2r LoRA on the unchanged base. PiSSA itself
subtracts A0 B0 from the kernel instead; keeping the base as loaded is the same model with the
same gradients, and the checkpoint's base, the bank's shared base and PEFT's base stay the one
that was loaded. `fold` writes the rank-2r LoRA (PEFT's own conversion of a PiSSA adapter on save).
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from ptune import partition
from ptune.errors import UserError
from ptune.models.ops import matmul, param
from ptune.models.sites.base import KINDS, SiteKind, register, union_regex

# PEFT initialises LoRA A like torch.nn.Linear: kaiming_uniform(a=sqrt(5)) = U(±1/sqrt(fan_in)).
lora_a_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


@dataclasses.dataclass(frozen=True)
class LoRA:
    rank: int
    alpha: float
    targets: str       # regex over module paths (see targets_regex)
    rslora: bool = False
    dropout: float = 0.0
    from_base: bool = False   # frozen initial factors A0, B0 are subtracted (PiSSA, OLoRA)

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


def plain(spec: LoRA) -> LoRA:
    """The plain LoRA a `from_base` one is: rank 2r, alpha scaled to keep the scale (PEFT's conversion)."""
    alpha = spec.alpha * (math.sqrt(2) if spec.rslora else 2)
    return dataclasses.replace(spec, rank=2 * spec.rank, alpha=alpha, from_base=False)


class LoRAKind(SiteKind):
    name, spec, leaves, wraps, sharding = "lora", LoRA, r"/lora_[ab]0?$", "product", "replicated"
    a, b = "lora_a", "lora_b"   # leaf names; the initial factors' are these + "0"
    defaults = {"gpt2": {"targets": ["c_attn"]}, "llama": {"targets": ["q_proj", "v_proj"]},
                "bert": {"targets": ["query", "value"]}}
    paddable = {"lora_a": 1, "lora_b": 0}   # rank: A's extra columns and B's extra rows are 0
    peft_type = "LORA"
    peft_options = frozenset({"r", "lora_alpha", "use_rslora", "lora_dropout", "bias", "init_lora_weights",
                              "megatron_core", "qalora_group_size", "use_dora"})
    peft_leaves = {"lora_A.weight": "lora_a", "lora_B.weight": "lora_b"}

    def factors(self, spec: LoRA, layer, features_in: int):
        """The layer's (A (in, r'), B (r', out)): its own, or with `from_base` [A, A0] and [B; -B0]."""
        a = param(layer, self.a, lora_a_init, (features_in, spec.rank), (layer.axes[0], None))
        b = param(layer, self.b, nn.initializers.zeros, (spec.rank, layer.features), (None, layer.axes[1]))
        if not spec.from_base:
            return a, b
        a0 = param(layer, self.a + "0", nn.initializers.zeros, a.shape, (layer.axes[0], None))
        b0 = param(layer, self.b + "0", nn.initializers.zeros, b.shape, (None, layer.axes[1]))
        return jnp.concatenate([a, a0], 1), jnp.concatenate([b, -b0], 0)

    def linear(self, spec: LoRA, call, x, inner):
        layer, dt = call.layer, call.layer.dtype
        y = inner(x)
        a, b = self.factors(spec, layer, x.shape[-1])
        h = nn.Dropout(spec.dropout)(x, deterministic=call.deterministic)
        return y + matmul(matmul(h, a, dt), b * spec.scale, dt)

    def plain_factors(self, leaf) -> tuple:
        """factors() outside the model, given `leaf`: leaf name -> the layer's array, or None."""
        a, b, a0 = leaf(self.a), leaf(self.b), leaf(self.a + "0")
        if a0 is None:
            return a, b
        return jnp.concatenate([a, a0], 1), jnp.concatenate([b, -leaf(self.b + "0")], 0)

    def fold(self, spec: LoRA, params: dict, config):
        """A `from_base` LoRA as the plain rank-2r LoRA it is (see `plain`)."""
        if not spec.from_base:
            return params, spec
        flat, folded = partition.flatten(params), {}
        for path in flat:
            module, _, leaf = path.rpartition("/")
            if leaf == self.a:
                factors = self.plain_factors(lambda name: flat.get(f"{module}/{name}"))
                folded[path], folded[f"{module}/{self.b}"] = factors
        initial = (f"/{self.a}0", f"/{self.b}0")
        kept = {p: folded.get(p, x) for p, x in flat.items() if not p.endswith(initial)}
        return partition.unflatten(kept), plain(spec)

    def merge(self, spec: LoRA, layer: dict, path: str) -> dict:
        """W + scale * A B, both (in, out)."""
        a, b = (np.asarray(x) for x in self.plain_factors(layer.get))
        out = {k: v for k, v in layer.items() if not self.owns(f"{path}/{k}")}
        out["kernel"] = layer["kernel"] + spec.scale * (a @ b)
        return out

    def bank_spec(self, specs):
        """Max rank, union of targets, and scale 1: `bank_leaf` folds each task's alpha/r into B."""
        present = [s for s in specs.values() if s is not None]
        unfolded = [task for task, s in specs.items() if s is not None and s.from_base]
        if unfolded:
            raise UserError(f"task {unfolded[0]!r}: its {self.name} is in training form (init from the base); "
                            "give the folded form (TaskAdapter.from_trained folds it, or use method.folded)")
        rank = max(s.rank for s in present)
        return LoRA(rank, float(rank), union_regex([s.targets for s in present]))

    def bank_leaf(self, spec: LoRA, bank_spec, path: str, value):
        return value * np.asarray(spec.scale, value.dtype) if path.endswith("/" + self.b) else value

    def peft_export(self, spec: LoRA, flat: dict, ctx):
        tensors = {ctx.peft_key(p, self.peft_leaves): np.asarray(x).T     # PEFT's nn.Linear: (out, in)
                   for p, x in flat.items() if self.owns(p)}
        targeted = [m for m in ctx.layers if f"{m}/{self.a}" in flat]
        config = dict(ctx.tuner_config(targeted), r=spec.rank, lora_alpha=spec.alpha, use_rslora=spec.rslora,
                      lora_dropout=spec.dropout, bias="none")
        return config, tensors

    def peft_load(self, config: dict, tensors: dict, ctx):
        """PEFT's LORA type is LoRA, or DoRA with `use_dora`: whichever of the two kinds (both of that type)
        the loader asks, the adapter's own kind reads it."""
        kind = KINDS["dora" if config.get("use_dora") else "lora"]
        origin = {p: (key, x.T) for p, (key, x) in ctx.layer_leaves(kind.name, tensors, kind.peft_leaves).items()}
        targeted = sorted({p.rpartition("/")[0] for p in origin})
        # r and lora_alpha default to PEFT's own defaults when a config leaves them out.
        options = dict(rank=config.get("r", 8), alpha=config.get("lora_alpha", 8), targets=ctx.names(targeted),
                       rslora=bool(config.get("use_rslora")), dropout=config.get("lora_dropout") or 0.0)
        return kind.name, options, origin


KIND = register(LoRAKind())
