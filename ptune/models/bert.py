"""BERT family encoder (BERT, MiniLM; HF `BertModel` / `BertForSequenceClassification` names):
post-LayerNorm blocks, absolute positions, token types, pooler and `classifier` head."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from ptune.models import common
from ptune.models.layers import ACTIVATIONS, Linear, attend
from ptune.models.model_config import ModelConfig
from ptune.models.sites import Sites

_init = lambda axes: nn.with_logical_partitioning(nn.initializers.normal(0.02), axes)


class BertEmbeddings(nn.Module):
    config: ModelConfig

    def setup(self):
        cfg, dt = self.config, self.config.compute_dtype
        embed = lambda n, axes: nn.Embed(n, cfg.hidden_size, embedding_init=_init(axes), dtype=dt)
        self.word_embeddings = embed(cfg.vocab_size, ("vocab", "embed"))
        self.position_embeddings = embed(cfg.max_positions, (None, "embed"))
        self.token_type_embeddings = embed(cfg.type_vocab_size, (None, "embed"))
        self.LayerNorm = nn.LayerNorm(cfg.norm_eps, dtype=dt)
        self.dropout = nn.Dropout(cfg.dropout)

    def __call__(self, p: common.Prepared, deterministic: bool):
        types = self.token_type_embeddings(jnp.zeros(p.positions.shape, jnp.int32))
        x = self.LayerNorm(p.x + self.position_embeddings(p.positions) + types)
        return self.dropout(x, deterministic=deterministic)


class BertOutput(nn.Module):
    """dense -> dropout -> [sites after the `where` sublayer] -> LayerNorm(h + residual): HF
    `attention.output` (where="attention") and `output` (where="mlp")."""
    config: ModelConfig
    sites: Sites
    where: str

    @nn.compact
    def __call__(self, h, residual, deterministic: bool):
        cfg, dt = self.config, self.config.compute_dtype
        axes = ("heads", "embed") if h.shape[-1] == cfg.hidden_size else ("mlp", "embed")
        h = Linear(cfg.hidden_size, axes, sites=self.sites, dtype=dt, name="dense")(h, deterministic)
        h = nn.Dropout(cfg.dropout)(h, deterministic=deterministic)
        h = self.sites.sublayer_output(h, self.where, dtype=dt)
        return nn.LayerNorm(cfg.norm_eps, dtype=dt, name="LayerNorm")(h + residual)


class BertSelfAttention(nn.Module):
    config: ModelConfig
    sites: Sites

    @nn.compact
    def __call__(self, x, p: common.Prepared, layer: int, deterministic: bool):
        cfg, dt = self.config, self.config.compute_dtype
        B, T, _ = x.shape
        proj = lambda name: Linear(cfg.hidden_size, ("embed", "heads"), sites=self.sites, dtype=dt,
                                   name=name)(x, deterministic).reshape(B, T, cfg.num_heads, cfg.head_dim)
        prefix = None if p.prefix is None else p.prefix[layer]
        return attend(self, proj("query"), proj("key"), proj("value"), p.visible, prefix=prefix, dtype=dt)


class BertLayer(nn.Module):
    config: ModelConfig
    sites: Sites

    @nn.compact
    def __call__(self, x, p: common.Prepared, layer: int, deterministic: bool):
        cfg = self.config
        h = _Attention(cfg, self.sites, name="attention")(x, p, layer, deterministic)
        i = _Intermediate(cfg, self.sites, name="intermediate")(h, deterministic)
        return BertOutput(cfg, self.sites, "mlp", name="output")(i, h, deterministic)


class _Attention(nn.Module):
    config: ModelConfig
    sites: Sites

    @nn.compact
    def __call__(self, x, p: common.Prepared, layer: int, deterministic: bool):
        h = BertSelfAttention(self.config, self.sites, name="self")(x, p, layer, deterministic)
        return BertOutput(self.config, self.sites, "attention", name="output")(h, x, deterministic)


class _Intermediate(nn.Module):
    config: ModelConfig
    sites: Sites

    @nn.compact
    def __call__(self, x, deterministic: bool):
        cfg = self.config
        h = Linear(cfg.intermediate_size, ("embed", "mlp"), sites=self.sites, dtype=cfg.compute_dtype,
                   name="dense")(x, deterministic)
        return ACTIVATIONS[cfg.activation](h)


class BertModel(nn.Module):
    """HF `bert`: `embeddings`, `encoder/layer_i`, `pooler`."""
    config: ModelConfig
    sites: Sites

    def setup(self):
        self.embeddings = BertEmbeddings(self.config)
        self.encoder = BertEncoder(self.config, self.sites)
        self.pooler = BertPooler(self.config)

    def embed(self, input_ids):
        return self.embeddings.word_embeddings(input_ids)

    def __call__(self, p: common.Prepared, deterministic: bool):
        return self.encoder(self.embeddings(p, deterministic), p, deterministic)


class BertEncoder(nn.Module):
    config: ModelConfig
    sites: Sites

    @nn.compact
    def __call__(self, x, p: common.Prepared, deterministic: bool):
        block = common.remat(BertLayer, self.config)
        for i in range(self.config.num_layers):
            x = block(self.config, self.sites, name=f"layer_{i}")(x, p, i, deterministic)
        return x


class BertPooler(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, h):
        """tanh(dense(first position)); h: (B,P+T,d). With a soft prompt that is the
        prompt's first vector, as in HF PEFT."""
        cfg = self.config
        dense = nn.Dense(cfg.hidden_size, kernel_init=_init(("embed", "embed_out")), dtype=cfg.compute_dtype,
                         name="dense")
        return jnp.tanh(dense(h[:, 0]))


class Bert(common.Model):
    body = BertModel
    body_name = "bert"
