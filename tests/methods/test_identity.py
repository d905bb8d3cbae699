"""Adding a method's sites leaves the model as it was: the same base weights, the same outputs.
Prompts and prefixes add context by design; for them the identity is "a soft prompt (prefix)
made from a text equals that text in front of the input"."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ptune import methods, models
from ptune.data.tokenizers import ByteTokenizer

PRESETS = ["gpt2-tiny", "llama-tiny", "bert-tiny"]
IDS = np.array([[11, 12, 13, 14, 15, 16], [17, 18, 19, 20, 21, 22]])
MASK = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
IDENTITY_AT_INIT = [("lora", {}), ("ia3", {}), ("adapter", {"placement": "houlsby"}),
                    ("adapter", {"placement": "pfeiffer"}), ("full", {}), ("head", {}), ("manual", {})]


def _build(preset, method=None):
    cfg = models.model_config(preset, num_labels=3)
    model = models.build(cfg, method.sites if method else models.Sites())
    return cfg, model, models.init(model, jax.random.key(0))


def _outputs(cfg, model, params):
    out = {"class": model.apply({"params": params}, IDS, MASK, output="class")}
    if cfg.causal:
        out["logits"] = model.apply({"params": params}, IDS, MASK, output="logits")
    return out


@functools.lru_cache
def _plain(preset):
    """The model without sites, its parameters and outputs (shared by the tests)."""
    cfg, model, params = _build(preset)
    return cfg, model, params, _outputs(cfg, model, params)


# bitfit refuses llama (no biases; test_errors).
@pytest.mark.parametrize("preset,name,options", [
    (p, n, o) for p in PRESETS for n, o in IDENTITY_AT_INIT + [("prompt", {}), ("prefix", {}), ("bitfit", {})]
    if (p, n) != ("llama-tiny", "bitfit")])
def test_sites_leave_base_weights_and_outputs_unchanged(preset, name, options):
    cfg, plain, base, expected = _plain(preset)
    method = methods.get(name, cfg, **options)
    _, model, params = _build(preset, method)
    flat_params = dict(jax.tree_util.tree_leaves_with_path(params))
    for path, leaf in jax.tree_util.tree_leaves_with_path(base):
        np.testing.assert_array_equal(flat_params[path], leaf)
    if (name, options) in IDENTITY_AT_INIT or name == "bitfit":
        got = _outputs(cfg, model, params)
        for key in expected:
            np.testing.assert_allclose(got[key], expected[key], atol=1e-6)


@pytest.mark.parametrize("preset", PRESETS)
def test_prompt_initialised_from_text_equals_that_text_in_front(preset):
    text = "Hi:"                                    # 3 bytes = 3 prompt vectors
    prefix_ids = ByteTokenizer().encode(text)
    cfg, plain, base, _ = _plain(preset)
    method = methods.get("prompt", cfg, length=len(prefix_ids), init="text", init_text=text)
    _, model, params = _build(preset, method)
    params = method.initialize(params, methods.InitContext(jax.random.key(1), cfg.family, ByteTokenizer().encode))
    ids = np.concatenate([np.tile(prefix_ids, (2, 1)), IDS], 1)
    mask = np.concatenate([np.ones((2, len(prefix_ids)), int), MASK], 1)
    expected = plain.apply({"params": base}, ids, mask, output="hidden")[:, len(prefix_ids):]
    got = model.apply({"params": params}, IDS, MASK, output="hidden")
    real = MASK.astype(bool)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(expected)[real], atol=2e-5)


def _cache_leaves(cache, name):
    """Per-layer cached keys or values in layer order."""
    flat = {"/".join(str(k.key) for k in path): x for path, x in jax.tree_util.tree_leaves_with_path(cache)}
    layer = lambda p: int(p.split("/")[1].split("_")[1])
    return [flat[p] for p in sorted((p for p in flat if p.endswith("/" + name)), key=layer)]


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])
def test_prefix_equals_a_kv_cache_of_context(preset):
    context = np.array([[30, 31, 32, 33]] * 2)
    P = context.shape[1]
    cfg, plain, base, _ = _plain(preset)
    cache = models.init_cache(plain, base, 2, P)
    _, state = plain.apply({"params": base, "cache": cache}, context, np.ones_like(context), np.tile(np.arange(P), (2, 1)),
                           output="hidden", decode=True, mutable=["cache"])
    keys, values = _cache_leaves(state["cache"], "key"), _cache_leaves(state["cache"], "value")
    kv = jnp.stack([jnp.stack([k[0], v[0]]) for k, v in zip(keys, values)])          # (layers, 2, P, K, D)
    method = methods.get("ptuning_v2", cfg, length=P)
    _, model, params = _build(preset, method)
    params = {**params, "prefix": {"kv": kv.reshape(kv.shape[:3] + (-1,))}}
    ids = np.concatenate([context, IDS], 1)
    mask = np.concatenate([np.ones_like(context), MASK], 1)
    expected = plain.apply({"params": base}, ids, mask)[:, P:]
    got = model.apply({"params": params}, IDS, MASK)
    real = MASK.astype(bool)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(expected)[real], atol=1e-5)


@pytest.mark.parametrize("preset", PRESETS)
def test_prefix_folding_keeps_outputs(preset):
    cfg = models.model_config(preset, num_labels=3)
    method = methods.get("prefix", cfg, length=5, hidden=16)
    model = models.build(cfg, method.sites)
    params = models.init(model, jax.random.key(0))
    folded, sites = method.folded(params, model)
    expected = model.apply({"params": params}, IDS, MASK, output="hidden")
    got = models.build(cfg, sites).apply({"params": folded}, IDS, MASK, output="hidden")
    np.testing.assert_allclose(got, expected, atol=1e-5)
