"""Soft prompt tuning (Lester et al., 2021): L trainable input embeddings prepended to the input,
uniform in [-0.5, 0.5] until a method re-initialises them (`ptune.methods.prompt`). Leaf
`prompt/embedding` (L, d): PEFT's `prompt_embeddings` as is."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import numpy as np

from ptune.models.ops import param
from ptune.models.sites.base import SiteKind, one_length, register


@dataclasses.dataclass(frozen=True)
class Prompt:
    length: int


class SoftPrompt(nn.Module):
    length: int
    features: int

    @nn.compact
    def __call__(self):
        init = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -0.5, 0.5)
        return param(self, "embedding", init, (self.length, self.features), (None, "embed"))


class PromptKind(SiteKind):
    name, spec, leaves, sharding = "prompt", Prompt, r"^prompt/", "replicated"
    peft_type = "PROMPT_TUNING"
    peft_options = frozenset({"num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads",
                              "num_layers", "prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path",
                              "tokenizer_kwargs"})

    def input_tokens(self, spec: Prompt) -> int:
        return spec.length

    def input_embeddings(self, spec: Prompt, config, *, name: str):
        return SoftPrompt(spec.length, config.hidden_size, name=name)()

    def bank_spec(self, specs):
        return one_length(self.name, specs)

    def peft_export(self, spec: Prompt, flat: dict, ctx):
        config = dict(ctx.prompt_config(spec.length), token_dim=ctx.config.hidden_size,
                      num_attention_heads=ctx.config.num_heads, prompt_tuning_init="RANDOM")
        return config, {"prompt_embeddings": np.asarray(flat["prompt/embedding"])}

    def peft_load(self, config: dict, tensors: dict, ctx):
        length = config.get("num_virtual_tokens")
        table = ctx.prompt_table(config, tensors, (length, ctx.config.hidden_size))
        return "prompt", {"length": length, "init": "uniform"}, {"prompt/embedding": ("prompt_embeddings", table)}


KIND = register(PromptKind())
