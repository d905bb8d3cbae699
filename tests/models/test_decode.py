"""KV-cache decoding (prefill, then one token at a time) reproduces a single full forward pass."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ptune import models, partition
from ptune.models.sites import LoRA, Prefix, Prompt, Sites
from decoding import cached_logits  # tests/models/decoding.py

IDS = jnp.array([[5, 6, 7, 8, 9, 10, 11, 12], [0, 0, 13, 14, 15, 16, 17, 18]])
MASK = jnp.array([[1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1, 1]])   # row 1 left-padded, as in generation
POSITIONS = jnp.maximum(jnp.cumsum(MASK, 1) - 1, 0)
REAL = np.asarray(MASK, bool)
PREFILL = 5
SITES = {"plain": Sites(), "lora": Sites(lora=LoRA(4, 8.0, r"attn/(c_attn|[qv]_proj)$")),
         "prefix": Sites(prefix=Prefix(3, None)), "prompt": Sites(prompt=Prompt(4))}


def _model(preset, sites):
    """A model with random weights everywhere, sites included, so that every site changes the outputs."""
    model = models.build(models.model_config(preset), sites)
    rng = np.random.default_rng(0)

    def leaf(keypath, shape):
        mean = 1.0 if partition.path_str(keypath).endswith("scale") else 0.0   # norms' scales near 1
        return jnp.asarray(mean + 0.05 * rng.standard_normal(shape.shape), shape.dtype)

    return model, jax.tree_util.tree_map_with_path(leaf, nn.unbox(models.abstract_params(model)))


def test_init_cache_is_empty_and_holds_the_soft_prompt():
    model, params = _model("llama-tiny", SITES["prompt"])
    cache = partition.flatten(models.init_cache(model, batch=2, max_len=8))
    assert cache["model/layers_0/self_attn/key"].shape == (2, 4 + 8, 2, 16)   # (B, prompt + max_len, kv heads, D)
    assert cache["index"].shape == ()
    assert all(not np.any(x) for x in cache.values())


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])
@pytest.mark.parametrize("sites", SITES.values(), ids=SITES.keys())
def test_cached_decoding_matches_full_forward(preset, sites):
    model, params = _model(preset, sites)
    full = jax.jit(functools.partial(model.apply, output="logits"))({"params": params}, IDS, MASK)
    logits, cache = cached_logits(model, params, IDS, MASK, POSITIONS, PREFILL)
    assert int(cache["index"]) == (sites.prompt.length if sites.prompt else 0) + IDS.shape[1]
    assert np.abs(logits - full)[REAL].max() < 1e-5
