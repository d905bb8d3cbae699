"""DoRA (Liu et al., 2024) as a researcher adds a new kind of site: a site kind and a method written outside
the package, named `mydora` (ptune's built-in `dora` is the same math, with PEFT export):
W' = m * (W + s B A) / ||W + s B A|| column-wise, m = ||W|| at init (the identity), the norm not differentiated.

    python scripts/train.py --config experiments/dora_outside.py --workdir workdirs/mydora
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ptune import methods
from ptune.config import base_config, with_method
from ptune.errors import UserError
from ptune.models import sites
from ptune.models.ops import matmul, param
from ptune.models.sites.lora import lora_a_init


@dataclasses.dataclass(frozen=True)
class DoRA:
    rank: int
    alpha: float
    targets: str


class DoRAKind(sites.SiteKind):
    name, spec, leaves, wraps, sharding = "mydora", DoRA, r"/mydora_[abm]$", "product", "replicated"

    def linear(self, spec, call, x, inner):
        layer, w, s, dt = call.layer, call.kernel, spec.alpha / spec.rank, call.layer.dtype
        m = param(layer, "mydora_m", lambda *_: jnp.linalg.norm(w, axis=0), (w.shape[1],), (layer.axes[1],))
        a = param(layer, "mydora_a", lora_a_init, (w.shape[0], spec.rank), (layer.axes[0], None))
        b = param(layer, "mydora_b", nn.initializers.zeros, (spec.rank, w.shape[1]), (None, layer.axes[1]))
        norm = jax.lax.stop_gradient(jnp.linalg.norm(w + s * a @ b, axis=0))
        return (inner(x) + matmul(matmul(x, a, dt), b * s, dt)) * (m / norm).astype(dt)

    def merge(self, spec, layer, path):
        w = layer["kernel"] + spec.alpha / spec.rank * layer["mydora_a"] @ layer["mydora_b"]
        rest = {k: v for k, v in layer.items() if not k.startswith("mydora_")}
        return {**rest, "kernel": w * layer["mydora_m"] / np.linalg.norm(w, axis=0)}

    def bank_spec(self, specs):   # tasks lacking DoRA get its identity; those that have it share one spec
        if len({s for s in specs.values() if s}) > 1:
            raise UserError(f"tasks' DoRA specs differ {specs}: bank them separately")
        return next(s for s in specs.values() if s)


def make(model_config, rank: int = 8, alpha: float = 16.0, targets=("c_attn",)):
    dora = DoRA(rank, alpha, sites.targets_regex(targets))
    return methods.Method("mydora", sites.Sites(mydora=dora), rules=[(r"/mydora_[abm]$", "mydora")])


sites.register(DoRAKind())
methods.register("mydora", make)


def get_config():
    return with_method(base_config(), "mydora")
