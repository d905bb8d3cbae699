"""VeRA (Kopiczko et al., 2024; PEFT's VeraConfig): dW = A diag(lambda_d) B diag(lambda_b) (in, out), where
A (in, r) and B (r, out) are frozen random projections shared by every layer and only the vectors
lambda_d (r,) and lambda_b (out,) train: r + out parameters a layer.

The projections are PEFT's, bit for bit: one A (r, max in) and B (max out, r) over the targeted
layers, drawn by torch's CPU generator seeded with `seed` (PEFT's projection_prng_key), each layer
using their leading rows/columns. ptune draws the same numbers with numpy (`projections`), so they are
a pure function of the spec: never trained, never checkpointed, the same in every run, bank and PEFT
adapter. Each targeted layer holds its slices as frozen leaves `vera_a` (in, r) and `vera_b` (r, out)
(a linear layer cannot reach a model-level parameter under nn.remat), r (in + out) floats a layer.
PEFT's init: lambda_b = 0 (the identity), lambda_d = d_initial.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from ptune.errors import UserError
from ptune.models.ops import matmul, param
from ptune.models.sites import lora
from ptune.models.sites.base import register, targets_regex
from ptune.models.sites.delta import DeltaKind, shared_bank_spec

# PEFT saves the shared projections once, beside the model rather than inside a module.
PEFT_PROJECTIONS = {"vera_a": "base_model.vera_A", "vera_b": "base_model.vera_B"}


@dataclasses.dataclass(frozen=True)
class VeRA:
    rank: int
    targets: str                   # regex over module paths (see targets_regex)
    projection: tuple[int, int]    # (max in, max out) over the targeted layers: A is (r, max in), B (max out, r)
    seed: int = 0                  # PEFT's projection_prng_key
    d_initial: float = 0.1
    dropout: float = 0.0


@functools.cache
def projections(seed: int, rank: int, projection: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """PEFT's (vera_A (r, max in), vera_B (max out, r)), float32: torch.Generator().manual_seed(seed), then
    kaiming_uniform (bound sqrt(6 / fan_in)) of A, then of B. torch's CPU uniform_ maps each 32-bit
    MT19937 output u to from + (to - from) * (u mod 2^24) / 2^24; numpy's legacy RandomState is the same
    MT19937, seeded the same way, and draws full-range uint32s one output each."""
    words = np.random.RandomState(seed).randint(0, 2**32, rank * sum(projection), dtype=np.uint32)
    out, start = [], 0
    for shape in [(rank, projection[0]), (projection[1], rank)]:
        n, bound = shape[0] * shape[1], np.float32(math.sqrt(6 / shape[1]))
        span = np.float64(bound - -bound)               # torch computes to - from in float32
        unit = (words[start:start + n] & (2**24 - 1)).astype(np.float64) / 2**24
        out.append((unit * span - np.float64(bound)).astype(np.float32).reshape(shape))
        out[-1].flags.writeable = False   # cached: shared by every caller
        start += n
    return out[0], out[1]


def projection_shape(config, targets: str) -> tuple[int, int]:
    """(max in, max out) over the linear layers of a `config` model whose paths `targets` searches."""
    shapes = [x.shape for p, x in _kernels(config).items() if re.search(targets, p.removesuffix("/kernel"))]
    if not shapes:
        layers = sorted({re.sub(r"_[0-9]+/", "_N/", p.removesuffix("/kernel")) for p in _kernels(config)})
        raise UserError(f"method vera: targets {targets!r} match no layer of this {config.family} model; linear "
                        f"layers are e.g. {layers[:8]}")
    return max(s[0] for s in shapes), max(s[1] for s in shapes)


@functools.cache
def _kernels(config) -> dict:
    """{path: abstract kernel} of a `config` model's linear layers."""
    from ptune import models, partition  # the models import the site kinds
    params = nn.unbox(models.abstract_params(models.build(config)))
    return {p: x for p, x in partition.flatten(params).items() if p.endswith("/kernel") and x.ndim == 2}


class VeRAKind(DeltaKind):
    name, spec, leaves = "vera", VeRA, r"/vera_(a|b|lambda_b|lambda_d)$"
    defaults = lora.KIND.defaults          # PEFT's VeRA targets are LoRA's
    peft_type, on_conv1d = "VERA", True
    # d_initial and init_weights only initialise; save_projection only says whether the file holds the
    # projections, which ptune regenerates either way.
    peft_options = frozenset({"r", "projection_prng_key", "save_projection", "vera_dropout", "d_initial",
                              "init_weights", "bias"})
    peft_names = ("vera_lambda_b", "vera_lambda_d")

    def create(self, spec: VeRA, layer, features_in: int) -> dict:
        a, b = projections(spec.seed, spec.rank, spec.projection)
        fixed = lambda x: lambda rng, shape, dtype: jnp.asarray(x, dtype)   # the spec's, whatever the rng
        (axis_in, axis_out), r, out = layer.axes, spec.rank, layer.features
        return {"vera_a": param(layer, "vera_a", fixed(a[:, :features_in].T), (features_in, r), (axis_in, None)),
                "vera_b": param(layer, "vera_b", fixed(b[:out].T), (r, out), (None, axis_out)),
                "vera_lambda_d": param(layer, "vera_lambda_d", nn.initializers.constant(spec.d_initial), (r,), (None,)),
                "vera_lambda_b": param(layer, "vera_lambda_b", nn.initializers.zeros, (out,), (axis_out,))}

    def delta(self, spec: VeRA, w):
        return (w["vera_a"] * w["vera_lambda_d"]) @ w["vera_b"] * w["vera_lambda_b"]

    def linear(self, spec: VeRA, call, x, inner):
        """lambda_b * ((lambda_d * (x A)) B), as PEFT computes it: never the (in, out) delta."""
        w, dt = self.create(spec, call.layer, x.shape[-1]), call.layer.dtype
        h = nn.Dropout(spec.dropout)(x, deterministic=call.deterministic)
        h = matmul(h, w["vera_a"], dt) * w["vera_lambda_d"].astype(dt)
        return inner(x) + matmul(h, w["vera_b"], dt) * w["vera_lambda_b"].astype(dt)

    def peft_config(self, spec: VeRA) -> dict:
        return dict(r=spec.rank, projection_prng_key=spec.seed, save_projection=True, d_initial=spec.d_initial,
                    vera_dropout=spec.dropout, bias="none")

    def options(self, config: dict) -> dict:
        # PEFT's defaults: r = 256, projection_prng_key = 0, d_initial = 0.1.
        return dict(rank=config.get("r", 256), projection_seed=config.get("projection_prng_key", 0),
                    d_initial=config.get("d_initial", 0.1), dropout=config.get("vera_dropout") or 0.0)

    def peft_export(self, spec: VeRA, flat: dict, ctx):
        config, tensors = super().peft_export(spec, flat, ctx)
        a, b = projections(spec.seed, spec.rank, spec.projection)
        return config, {**tensors, PEFT_PROJECTIONS["vera_a"]: a, PEFT_PROJECTIONS["vera_b"]: b}

    def peft_load(self, config: dict, tensors: dict, ctx):
        saved = {key: tensors[key] for key in PEFT_PROJECTIONS.values() if key in tensors}
        name, options, origin = super().peft_load(config, {k: x for k, x in tensors.items() if k not in saved}, ctx)
        seed, shape = options["projection_seed"], projection_shape(ctx.config, targets_regex(options["targets"]))
        drawn = dict(zip(PEFT_PROJECTIONS.values(), projections(seed, options["rank"], shape)))
        for key, x in saved.items():
            if x.shape != drawn[key].shape or not np.array_equal(x, drawn[key].astype(x.dtype)):
                raise UserError(f"{ctx.weights}: {key!r} {x.shape} is not the projection PEFT draws from "
                                f"projection_prng_key={seed} for these layers {drawn[key].shape}; ptune redraws "
                                "VeRA's projections from the key, so it loads adapters whose projections PEFT drew")
        return name, options, origin

    def bank_spec(self, specs):
        """One rank, seed and projection shape for all tasks (they fix the shared projections), the union
        of targets; each task's lambdas are its own."""
        return shared_bank_spec(self.name, specs, ("rank", "seed", "projection"), dropout=0.0)


KIND = register(VeRAKind())
