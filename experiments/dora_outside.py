"""DoRA (Liu et al., 2024), a site kind and a method written outside the package (PEFT's use_dora):
W' = m * (W + s B A) / ||W + s B A|| column-wise, m = ||W|| at init (the identity), the norm not differentiated.

    python scripts/train.py --config experiments/dora_outside.py --workdir workdirs/dora
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ptune import methods
from ptune.config import base_config, with_method
from ptune.models import sites
from ptune.models.ops import matmul, param
from ptune.models.sites.lora import lora_a_init


@dataclasses.dataclass(frozen=True)
class DoRA:
    rank: int
    alpha: float
    targets: str


class DoRAKind(sites.SiteKind):
    name, spec, leaves, wraps, sharding = "dora", DoRA, r"/dora_[abm]$", "product", "replicated"

    def linear(self, spec, call, x, inner):
        layer, w, s, dt = call.layer, call.kernel, spec.alpha / spec.rank, call.layer.dtype
        m = param(layer, "dora_m", lambda *_: jnp.linalg.norm(w, axis=0), (w.shape[1],), (layer.axes[1],))
        a = param(layer, "dora_a", lora_a_init, (w.shape[0], spec.rank), (layer.axes[0], None))
        b = param(layer, "dora_b", nn.initializers.zeros, (spec.rank, w.shape[1]), (None, layer.axes[1]))
        norm = jax.lax.stop_gradient(jnp.linalg.norm(w + s * a @ b, axis=0))
        return (inner(x) + matmul(matmul(x, a, dt), b * s, dt)) * (m / norm).astype(dt)

    def merge(self, spec, layer, path):
        w = layer["kernel"] + spec.alpha / spec.rank * layer["dora_a"] @ layer["dora_b"]
        rest = {k: v for k, v in layer.items() if not k.startswith("dora_")}
        return {**rest, "kernel": w * layer["dora_m"] / np.linalg.norm(w, axis=0)}

    def bank_spec(self, specs):   # tasks lacking DoRA get its identity; those that have it share one spec
        if len({s for s in specs.values() if s}) > 1:
            raise ValueError(f"tasks' DoRA specs differ {specs}: bank them separately")
        return next(s for s in specs.values() if s)


def make(model_config, rank: int = 8, alpha: float = 16.0, targets=("c_attn",)):
    dora = DoRA(rank, alpha, sites.targets_regex(targets))
    return methods.Method("dora", sites.Sites(dora=dora), rules=[(r"/dora_[abm]$", "dora")])


sites.register(DoRAKind())
methods.register("dora", make)


def get_config():
    return with_method(base_config(), "dora")
