"""Prefix tuning (Li & Liang, 2021): per-layer key/value prefixes of length L that every query sees.

With `hidden` they come from Li & Liang's reparameterisation (embedding -> Linear -> tanh ->
Linear), which `fold` evaluates once into the direct form, one `kv` leaf of shape
(layers, 2, L, kv_heads * head_dim) (P-tuning v2's own form). PEFT saves the direct form too.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from ptune.errors import UserError
from ptune.models.ops import normal, param
from ptune.models.sites.base import SiteKind, one_length, register


@dataclasses.dataclass(frozen=True)
class Prefix:
    length: int
    hidden: int | None = None   # Li & Liang's MLP width; None stores keys/values directly


class PrefixKV(nn.Module):
    """Per-layer key/value prefixes, shape (layers, 2, L, kv_heads, head_dim), float32.

    They do not depend on the batch, so they are computed in float32 whatever the
    compute dtype; `attend` casts them to the keys' dtype.
    """
    spec: Prefix
    num_layers: int
    kv_heads: int
    head_dim: int
    d_model: int

    @nn.compact
    def __call__(self):
        L, width = self.spec.length, self.num_layers * 2 * self.kv_heads * self.head_dim
        shape = (self.num_layers, 2, L, self.kv_heads, self.head_dim)
        if self.spec.hidden is None:
            kv = param(self, "kv", normal(0.02), (self.num_layers, 2, L, self.kv_heads * self.head_dim),
                       ("layers", None, None, "kv"))
            return kv.reshape(shape)
        e = param(self, "embedding", normal(0.02), (L, self.d_model), (None, "embed"))
        h = jnp.tanh(nn.Dense(self.spec.hidden, name="mlp_in")(e))
        kv = nn.Dense(width, name="mlp_out")(h)                       # (L, layers*2*kv)
        return kv.reshape(L, self.num_layers, 2, self.kv_heads, self.head_dim).transpose(1, 2, 0, 3, 4)


def prefix_module(spec: Prefix, config, name: str | None = None) -> PrefixKV:
    return PrefixKV(spec, config.num_layers, config.num_kv_heads, config.head_dim, config.hidden_size, name=name)


class PrefixKind(SiteKind):
    name, spec, leaves, sharding = "prefix", Prefix, r"^prefix/", "replicated"
    peft_type = "PREFIX_TUNING"
    peft_options = frozenset({"num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads",
                              "num_layers", "encoder_hidden_size", "prefix_projection", "init_weights"})

    def kv_tokens(self, spec: Prefix) -> int:
        return spec.length

    def layer_kv(self, spec: Prefix, config, *, name: str):
        return prefix_module(spec, config, name)()

    def fold(self, spec: Prefix, params: dict, config):
        """Evaluate the reparameterisation once: `prefix/{embedding,mlp_*}` -> `prefix/kv`."""
        if spec.hidden is None:
            return params, spec
        kv = prefix_module(spec, config).apply({"params": params["prefix"]})   # (layers, 2, L, K, D)
        return {**params, "prefix": {"kv": kv.reshape(kv.shape[:3] + (-1,))}}, Prefix(spec.length, None)

    def bank_spec(self, specs):
        """One length for every task (see `one_length`), in the folded form."""
        spec = one_length(self.name, specs)
        unfolded = [task for task, s in specs.items() if s is not None and s.hidden is not None]
        if unfolded:
            raise UserError(f"task {unfolded[0]!r}: its prefix is in training form (MLP); give the folded form "
                            "(TaskAdapter.from_trained folds it, or use method.folded)")
        return spec

    def peft_export(self, spec: Prefix, flat: dict, ctx):
        """PEFT's table is (L, layers * 2 * kv_dim), its rows viewed as (layers*2, heads, head_dim); for
        grouped-query attention token_dim and the heads are the keys/values'."""
        _refuse_bert(ctx.config)
        cfg, kv = ctx.config, np.asarray(flat["prefix/kv"])          # (layers, 2, L, kv_dim)
        kv_dim = cfg.num_kv_heads * cfg.head_dim
        config = dict(ctx.prompt_config(spec.length), token_dim=kv_dim, num_attention_heads=cfg.num_kv_heads,
                      encoder_hidden_size=kv_dim, prefix_projection=False)
        return config, {"prompt_embeddings": kv.transpose(2, 0, 1, 3).reshape(kv.shape[2], -1)}

    def peft_load(self, config: dict, tensors: dict, ctx):
        """PEFT saves the prefix MLP's output, so prefix_projection=True loads as the direct form too."""
        _refuse_bert(ctx.config, ctx.weights)
        cfg, length = ctx.config, config.get("num_virtual_tokens")
        table = ctx.prompt_table(config, tensors, (length, cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim))
        kv = table.reshape(length, cfg.num_layers, 2, -1).transpose(1, 2, 0, 3)   # (layers, 2, L, kv_dim)
        return "ptuning_v2", {"length": length}, {"prefix/kv": ("prompt_embeddings", kv)}


def _refuse_bert(config, where=None):
    """PEFT applies prefixes through past_key_values, which transformers' BERT does not take."""
    if config.causal:
        return
    if where is None:
        raise UserError("PEFT applies prefix tuning through past_key_values, which transformers' BERT models do "
                        "not accept, so no PEFT model can load a BERT prefix; use prompt tuning or LoRA for BERT")
    raise UserError(f"{where}: a PEFT prefix-tuning adapter for BERT cannot exist (transformers' BERT takes no "
                    "past_key_values); this adapter does not belong to a BERT model")


KIND = register(PrefixKind())
