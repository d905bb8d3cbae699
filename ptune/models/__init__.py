"""Model families and how to build, initialise and inspect them.

    model = build(model_config("gpt2-tiny"), sites)
    params = init(model, jax.random.key(0))
"""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp

from ptune import partition
from ptune.errors import UserError
from ptune.models.bert import Bert
from ptune.models.gpt2 import GPT2
from ptune.models.hf_config import HF_FAMILIES
from ptune.models.llama import Llama
from ptune.models.model_config import PRESETS, ModelConfig, model_config
from ptune.models.sites import KINDS, Sites, is_site

FAMILIES = {"gpt2": GPT2, "llama": Llama, "bert": Bert}

# PEFT's default target modules per family and HF model type, as the built-in kinds declare them
# (`SiteKind.defaults_for`): {"gpt2": {"lora": [...], "ia3": [...], "ia3_feedforward": [...]}, ..., "qwen3": ...}.
DEFAULT_TARGETS = {model_type: {kind.name if option == "targets" else f"{kind.name}_{option}": names
                                for kind in KINDS.values()
                                for option, names in kind.defaults_for(family, model_type).items()}
                   for model_type, family in HF_FAMILIES.items()}

__all__ = ["DEFAULT_TARGETS", "FAMILIES", "PRESETS", "WORD_EMBEDDINGS", "ModelConfig", "Sites", "build", "init",
           "abstract_params", "from_checkpoint", "linear_layers", "model_config", "init_cache"]


def build(config: ModelConfig, sites: Sites = Sites()) -> nn.Module:
    return FAMILIES[config.family](config, sites)


def _dummy(batch: int, length: int):
    return jnp.zeros((batch, length), jnp.int32)


def abstract_params(model: nn.Module, length: int = 8):
    """Parameter shapes/dtypes (boxed with logical axis names), without allocating anything."""
    return jax.eval_shape(lambda: model.init(jax.random.key(0), _dummy(1, length), output="hidden")["params"])


def init(model: nn.Module, rng, length: int = 8, pretrained: dict | None = None):
    """Parameters (unboxed), checked that every linear-layer site found a layer.

    `pretrained` (nested dicts of arrays, e.g. base weights from a checkpoint) is used as
    is; only the parameters it lacks (sites, a fresh head) are initialised, so no time is
    spent drawing random base weights that would be thrown away.
    """
    if pretrained is None:
        params = jax.jit(lambda r: model.init(r, _dummy(1, length), output="hidden"))(rng)["params"]
    else:
        # Applying (not initialising) creates only what the call touches: ask for the class
        # output when there is a task head, or a fresh head would be left out.
        output = "class" if model.config.num_labels else "hidden"
        fill = lambda r, p: model.apply({"params": p}, _dummy(1, length), output=output,
                                        rngs={"params": r}, mutable=["params"])[1]["params"]
        params = jax.jit(fill)(rng, pretrained)
    params = nn.unbox(params)
    check_sites(model, params)
    return params


def from_checkpoint(model: nn.Module, state: dict, rng):
    """Parameters with the base from an HF-named `state` dict and fresh sites (and heads it lacks)."""
    from ptune.models import hf
    template = nn.unbox(abstract_params(model))
    loaded = partition.flatten(hf.from_hf(model.config.family, state, template))
    pretrained = {p: x for p, x in loaded.items() if not isinstance(x, jax.ShapeDtypeStruct)}
    return init(model, rng, pretrained=partition.unflatten(pretrained))


def linear_layers(params) -> list[str]:
    """Module paths of every linear layer (those with a 2-D `kernel`)."""
    return [p[: -len("/kernel")] for p, x in partition.flatten(params).items()
            if p.endswith("/kernel") and x.ndim == 2]


def check_sites(model: nn.Module, params):
    """Every kind of the model's sites owns leaves (a `targets` pattern that matches no layer is a config
    error, not a no-op), and every leaf the sites add is owned by its kind: one that is not would pass
    for a base weight (sharded, exported and merged as one)."""
    paths, layers = list(partition.flatten(params)), linear_layers(params)
    for kind, spec in model.sites.kinds():
        if any(kind.owns(p) for p in paths):
            continue
        if kind.wraps and not any(kind.targets(spec, layer) for layer in layers):
            names = sorted({re.sub(r"_[0-9]+/", "_N/", p) for p in layers})
            raise UserError(f"method {kind.name}: targets {spec.targets!r} match no layer of this "
                            f"{model.config.family} model; linear layers are e.g. {names}")
        raise UserError(f"site kind {kind.name!r}: its leaves pattern {kind.leaves!r} matches no parameter the "
                        "model grew; make it match the parameters the kind creates")
    if model.sites.specs:
        base = partition.flatten(nn.unbox(abstract_params(build(model.config))))
        stray = [p for p in paths if p not in base and not is_site(p)]
        if stray:
            raise UserError(f"sites {model.sites.names()} added {stray[:3]}, which no site kind's `leaves` "
                            "pattern matches; widen the pattern of the kind that creates them")


def init_cache(model: nn.Module, batch: int, max_len: int):
    """An empty KV cache for `max_len` text tokens (plus any soft prompt)."""
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), _dummy(batch, max_len), output="hidden",
                                                  decode=True))
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), nn.unbox(variables["cache"]))


# Where each family keeps its input word embeddings (prompt initialisation reads them).
WORD_EMBEDDINGS = {"gpt2": "transformer/wte/embedding", "llama": "model/embed_tokens/embedding",
                   "bert": "bert/embeddings/word_embeddings/embedding"}
