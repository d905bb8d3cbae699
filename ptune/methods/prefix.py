"""Prefix tuning (Li & Liang, 2021): per-layer key/value prefixes of length L, produced
during training by an MLP over L embeddings (the reparameterisation that stabilises
training) and folded into plain keys/values for inference and saving."""

import dataclasses

from ptune.methods.base import Method, positive_int
from ptune.models.layers import PrefixKV
from ptune.models.sites import Prefix, Sites


def make(model_config, length: int = 20, hidden: int = 512) -> Method:
    positive_int("prefix", "length", length, model_config.max_positions, "(the model's context)")
    positive_int("prefix", "hidden", hidden)
    return Method("prefix", Sites(prefix=Prefix(length, hidden)), rules=[(r"^prefix/", "prefix")], fold=fold)


def fold(params, model):
    """Evaluate the reparameterisation once: `prefix/{embedding,mlp_*}` -> `prefix/kv`."""
    cfg, spec = model.config, model.sites.prefix
    module = PrefixKV(spec, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size)
    kv = module.apply({"params": params["prefix"]})                # (layers, 2, L, K, D)
    folded = {**params, "prefix": {"kv": kv.reshape(kv.shape[:3] + (-1,))}}
    return folded, dataclasses.replace(model.sites, prefix=Prefix(spec.length, None))
