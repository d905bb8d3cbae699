"""GPT-2 (HF `GPT2LMHeadModel` / `GPT2ForSequenceClassification` parameter names)."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from ptune.models import common
from ptune.models.layers import ACTIVATIONS, Linear, attend
from ptune.models.model_config import ModelConfig
from ptune.models.sites import Sites

_EMBED = nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed"))
_POS = nn.with_logical_partitioning(nn.initializers.normal(0.01), (None, "embed"))


class GPT2Attention(nn.Module):
    config: ModelConfig
    sites: Sites

    @nn.compact
    def __call__(self, x, p: common.Prepared, layer: int, deterministic: bool):
        cfg, dt = self.config, self.config.compute_dtype
        B, T, _ = x.shape
        qkv = Linear(3 * cfg.hidden_size, ("embed", "heads"), sites=self.sites, dtype=dt,
                     name="c_attn")(x, deterministic)
        q, k, v = (t.reshape(B, T, cfg.num_heads, cfg.head_dim) for t in jnp.split(qkv, 3, axis=-1))
        prefix = None if p.prefix is None else p.prefix[layer]
        out = attend(self, q, k, v, p.visible, prefix=prefix, cache_index=p.cache_index, dtype=dt)
        return Linear(cfg.hidden_size, ("heads", "embed"), sites=self.sites, dtype=dt,
                      name="c_proj")(out, deterministic)


class GPT2MLP(nn.Module):
    config: ModelConfig
    sites: Sites

    @nn.compact
    def __call__(self, x, deterministic: bool):
        cfg, dt = self.config, self.config.compute_dtype
        h = Linear(cfg.intermediate_size, ("embed", "mlp"), sites=self.sites, dtype=dt, name="c_fc")(x, deterministic)
        h = ACTIVATIONS[cfg.activation](h)
        return Linear(cfg.hidden_size, ("mlp", "embed"), sites=self.sites, dtype=dt, name="c_proj")(h, deterministic)


class GPT2Block(nn.Module):
    config: ModelConfig
    sites: Sites

    @nn.compact
    def __call__(self, x, p: common.Prepared, layer: int, deterministic: bool):
        cfg, dt = self.config, self.config.compute_dtype
        drop = nn.Dropout(cfg.dropout)
        h = GPT2Attention(cfg, self.sites, name="attn")(
            nn.LayerNorm(cfg.norm_eps, dtype=dt, name="ln_1")(x), p, layer, deterministic)
        h = self.sites.sublayer_output(h, "attention", dtype=dt, name="attn_{kind}")
        x = x + drop(h, deterministic=deterministic)
        h = GPT2MLP(cfg, self.sites, name="mlp")(nn.LayerNorm(cfg.norm_eps, dtype=dt, name="ln_2")(x),
                                                 deterministic)
        h = self.sites.sublayer_output(h, "mlp", dtype=dt, name="mlp_{kind}")
        return x + drop(h, deterministic=deterministic)


class GPT2Model(nn.Module):
    """HF `transformer`: embeddings `wte`/`wpe`, blocks `h_i`, final norm `ln_f`."""
    config: ModelConfig
    sites: Sites

    def setup(self):
        cfg, dt = self.config, self.config.compute_dtype
        self.wte = nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=_EMBED, dtype=dt)
        self.wpe = nn.Embed(cfg.max_positions, cfg.hidden_size, embedding_init=_POS, dtype=dt)
        block = common.remat(GPT2Block, cfg)
        self.h = [block(cfg, self.sites) for _ in range(cfg.num_layers)]
        self.ln_f = nn.LayerNorm(cfg.norm_eps, dtype=dt)
        self.drop = nn.Dropout(cfg.dropout)

    def embed(self, input_ids):
        return self.wte(input_ids)

    @property
    def token_embedding(self) -> nn.Embed:
        return self.wte

    def __call__(self, p: common.Prepared, deterministic: bool):
        x = self.drop(p.x + self.wpe(p.positions), deterministic=deterministic)
        for i, block in enumerate(self.h):
            x = block(x, p, i, deterministic)
        return self.ln_f(x)


class GPT2(common.Model):
    body = GPT2Model
    body_name = "transformer"
