"""Prefix tuning (Li & Liang, 2021): per-layer key/value prefixes of length L, produced
during training by an MLP over L embeddings (the reparameterisation that stabilises
training) and folded into plain keys/values for inference and saving (the prefix kind's
`fold`, ptune.models.sites.prefix)."""

from ptune.methods.base import Method, positive_int
from ptune.models.sites import Prefix, Sites


def make(model_config, length: int = 20, hidden: int = 512) -> Method:
    positive_int("prefix", "length", length, model_config.max_positions, "(the model's context)")
    positive_int("prefix", "hidden", hidden)
    return Method("prefix", Sites(prefix=Prefix(length, hidden)), rules=[(r"^prefix/", "prefix")])
