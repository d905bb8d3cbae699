"""Bottleneck adapters: x + up(act(down(x))), up = 0 at init, after a block's sublayer and before
its residual. Houlsby et al. (2019) place one after attention and one after the MLP of every block;
Pfeiffer et al. (2021) only after the MLP. PEFT has no format for them."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ptune.errors import UserError
from ptune.models.ops import ACTIVATIONS, matmul, normal, param
from ptune.models.sites.base import SiteKind, register


@dataclasses.dataclass(frozen=True)
class Adapter:
    size: int
    placement: str = "houlsby"   # houlsby: after attention and MLP; pfeiffer: after MLP
    activation: str = "relu"

    @property
    def after_attention(self) -> bool:
        return self.placement == "houlsby"


class Bottleneck(nn.Module):
    """x + up(act(down(x))), up initialised to 0 (identity)."""
    spec: Adapter
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        d, m, zeros, dt = x.shape[-1], self.spec.size, nn.initializers.zeros, self.dtype
        x = x.astype(dt)
        h = matmul(x, param(self, "down", normal(1e-3), (d, m), ("embed", None)), dt)
        h = ACTIVATIONS[self.spec.activation](h + param(self, "down_bias", zeros, (m,), (None,)).astype(dt))
        h = matmul(h, param(self, "up", zeros, (m, d), (None, "embed")), dt)
        return x + h + param(self, "up_bias", zeros, (d,), ("embed",)).astype(dt)


class AdapterKind(SiteKind):
    name, spec, leaves, sharding = "adapter", Adapter, r"adapter/", "replicated"
    # Size: every activation has act(0) = 0, so a padded unit is dead.
    paddable = {"down": 1, "down_bias": 0, "up": 0}

    def sublayer_output(self, spec: Adapter, h, where: str, *, dtype, name: str):
        if where == "attention" and not spec.after_attention:
            return h
        return Bottleneck(spec, dtype=dtype, name=name)(h)

    def bank_spec(self, specs):
        """The largest size, Houlsby if any task is (a Pfeiffer task's attention adapter keeps up = 0),
        and one activation."""
        present = {task: s for task, s in specs.items() if s is not None}
        activations = {s.activation for s in present.values()}
        if len(activations) > 1:
            used = {task: s.activation for task, s in present.items()}
            raise UserError(f"tasks' adapters use different activations {used}; a bank's adapters share one "
                            "activation: bank these tasks separately")
        placement = "houlsby" if any(s.after_attention for s in present.values()) else "pfeiffer"
        return Adapter(max(s.size for s in present.values()), placement, activations.pop())

    def peft_export(self, spec, flat, ctx):
        raise UserError("the method has bottleneck adapters, which PEFT has no format for; export LoRA, IA3, "
                        "prompt or prefix tuning")


KIND = register(AdapterKind())
