"""LLaMA family: RoPE, RMSNorm, SwiGLU, grouped-query attention, optional qkv bias, q/k norms,
explicit head width, sliding-window attention and tied embeddings (HF `LlamaForCausalLM` /
`LlamaForSequenceClassification` names), so SmolLM2-, Llama-, Qwen2-, Qwen3- and Mistral-style
checkpoints fit."""

from __future__ import annotations

import flax.linen as nn

from ptune.models import common, rope_scaling
from ptune.models.layers import ACTIVATIONS, Linear, attend, rope
from ptune.models.model_config import ModelConfig
from ptune.models.sites import Sites

_EMBED = nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed"))


class LlamaAttention(nn.Module):
    config: ModelConfig
    sites: Sites

    @nn.compact
    def __call__(self, x, p: common.Prepared, layer: int, deterministic: bool):
        cfg, dt = self.config, self.config.compute_dtype
        B, T, _ = x.shape
        proj = lambda n, heads, name: Linear(heads * cfg.head_dim, ("embed", "heads"), cfg.qkv_bias, self.sites,
                                             dtype=dt, name=name)(x, deterministic).reshape(B, T, heads, cfg.head_dim)
        # Qwen3 normalises each head's q and k (one weight of head_dim shared by the heads) before RoPE.
        norm = lambda h, name: nn.RMSNorm(cfg.norm_eps, dtype=dt, name=name)(h) if cfg.qk_norm else h
        inv_freq, scale = rope_scaling.frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_positions)
        q = rope(norm(proj("q", cfg.num_heads, "q_proj"), "q_norm"), p.positions, inv_freq, scale)
        k = rope(norm(proj("k", cfg.num_kv_heads, "k_proj"), "k_norm"), p.positions, inv_freq, scale)
        v = proj("v", cfg.num_kv_heads, "v_proj")
        prefix = None if p.prefix is None else p.prefix[layer]
        out = attend(self, q, k, v, p.visible, prefix=prefix, cache_index=p.cache_index, dtype=dt)
        return Linear(cfg.hidden_size, ("heads", "embed"), False, self.sites, dtype=dt,
                      name="o_proj")(out, deterministic)


class LlamaMLP(nn.Module):
    config: ModelConfig
    sites: Sites

    @nn.compact
    def __call__(self, x, deterministic: bool):
        cfg, dt = self.config, self.config.compute_dtype
        lin = lambda n, axes, name: Linear(n, axes, False, self.sites, dtype=dt, name=name)
        gate = lin(cfg.intermediate_size, ("embed", "mlp"), "gate_proj")(x, deterministic)
        up = lin(cfg.intermediate_size, ("embed", "mlp"), "up_proj")(x, deterministic)
        hidden = ACTIVATIONS[cfg.activation](gate) * up
        return lin(cfg.hidden_size, ("mlp", "embed"), "down_proj")(hidden, deterministic)


class LlamaBlock(nn.Module):
    config: ModelConfig
    sites: Sites

    @nn.compact
    def __call__(self, x, p: common.Prepared, layer: int, deterministic: bool):
        cfg, dt = self.config, self.config.compute_dtype
        h = LlamaAttention(cfg, self.sites, name="self_attn")(
            nn.RMSNorm(cfg.norm_eps, dtype=dt, name="input_layernorm")(x), p, layer, deterministic)
        h = self.sites.sublayer_output(h, "attention", dtype=dt, name="attn_{kind}")
        x = x + h
        h = LlamaMLP(cfg, self.sites, name="mlp")(
            nn.RMSNorm(cfg.norm_eps, dtype=dt, name="post_attention_layernorm")(x), deterministic)
        h = self.sites.sublayer_output(h, "mlp", dtype=dt, name="mlp_{kind}")
        return x + h


class LlamaModel(nn.Module):
    """HF `model`: `embed_tokens`, blocks `layers_i`, final `norm`."""
    config: ModelConfig
    sites: Sites

    def setup(self):
        cfg, dt = self.config, self.config.compute_dtype
        self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=_EMBED, dtype=dt)
        block = common.remat(LlamaBlock, cfg)
        self.layers = [block(cfg, self.sites) for _ in range(cfg.num_layers)]
        self.norm = nn.RMSNorm(cfg.norm_eps, dtype=dt)

    def embed(self, input_ids):
        return self.embed_tokens(input_ids)

    @property
    def token_embedding(self) -> nn.Embed:
        return self.embed_tokens

    def __call__(self, p: common.Prepared, deterministic: bool):
        x = p.x
        for i, block in enumerate(self.layers):
            x = block(x, p, i, deterministic)
        return self.norm(x)


class Llama(common.Model):
    body = LlamaModel
    body_name = "model"
