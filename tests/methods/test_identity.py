"""Adding a method's sites leaves the model as it was before training: the same base
weights (same init rng) and the same outputs. Prompts and prefixes add context by design;
for them the identity is "a soft prompt made from a text equals that text in front of the
input" and "a prefix equals a KV cache of that text"."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ptune import methods, models, partition
from ptune.data.tokenizers import ByteTokenizer

TINY = ["gpt2-tiny", "llama-tiny", "bert-tiny"]
DECODERS = ["gpt2-tiny", "llama-tiny"]
P = 4                                    # prompt / prefix length everywhere (shares cached inits)
TEXT = "Hi: "                            # exactly P bytes
IDS = np.array([[11, 12, 13, 14, 15, 16], [17, 18, 19, 20, 21, 22]])
MASK = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])     # padding in one row
REAL = MASK.astype(bool)
ENCODE = ByteTokenizer().encode

# Methods whose sites are identity at init (LoRA B = 0, IA3 = 1, adapter up = 0).
IDENTITY = [("lora", {}), ("ia3", {}), ("adapter", {"placement": "houlsby"}),
            ("adapter", {"placement": "pfeiffer"})]
NO_SITES = ["full", "bitfit", "head", "manual"]
CONTEXT = [("prompt", {"length": P}), ("prefix", {"length": P, "hidden": 16}), ("ptuning_v2", {"length": P})]


def cases(table):
    return [pytest.param(n, o, id="-".join([n, *map(str, o.values())])) for n, o in table]


def outputs(cfg, model, params, ids=IDS, mask=MASK):
    """{"class": (B, labels), "hidden": (B, T, d)} and, for decoders, "logits": (B, T, V)."""
    out = {"class": model.apply({"params": params}, ids, mask, output="class"),
           "hidden": model.apply({"params": params}, ids, mask, output="hidden")}
    if cfg.causal:
        out["logits"] = model.apply({"params": params}, ids, mask, output="logits")
    return {k: np.asarray(v) for k, v in out.items()}


def context(text_ids, batch=2):
    """(ids, mask) of `text_ids` in front of IDS / MASK."""
    t = np.tile(np.asarray(text_ids), (batch, 1))
    return np.concatenate([t, IDS], 1), np.concatenate([np.ones_like(t), MASK], 1)


def assert_base_unchanged(base, params):
    """Every leaf of the plain model's init appears, bitwise equal, in `params`."""
    flat, sited = partition.flatten(base), partition.flatten(params)
    missing = sorted(set(flat) - set(sited))
    assert not missing, f"base leaves missing from the sited model: {missing[:3]}"
    for path, leaf in flat.items():
        np.testing.assert_array_equal(sited[path], leaf, err_msg=path)


def ctx(cfg):
    return methods.InitContext(jax.random.key(1), cfg.family, ENCODE, ("yes", "no"))


@pytest.mark.parametrize("preset", TINY)
@pytest.mark.parametrize("name,options", cases(IDENTITY + CONTEXT))
def test_sites_leave_base_weights_unchanged(tiny, preset, name, options):
    _, _, base = tiny(preset, models.Sites())
    cfg = models.model_config(preset, num_labels=3)
    method = methods.get(name, cfg, **options)
    assert method.sites != models.Sites()
    _, _, params = tiny(preset, method.sites)
    assert len(partition.flatten(params)) > len(partition.flatten(base))
    assert_base_unchanged(base, params)
    assert_base_unchanged(base, method.initialize(params, ctx(cfg)))


@pytest.mark.parametrize("preset", TINY)
@pytest.mark.parametrize("name,options", cases(IDENTITY))
def test_identity_sites_leave_outputs_unchanged(tiny, preset, name, options):
    cfg, plain, base = tiny(preset, models.Sites())
    expected = outputs(cfg, plain, base)
    method = methods.get(name, cfg, **options)
    _, model, params = tiny(preset, method.sites)
    params = method.initialize(params, ctx(cfg))
    got = outputs(cfg, model, params)
    assert got.keys() == expected.keys()
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], atol=1e-6, rtol=0, err_msg=key)


@pytest.mark.parametrize("preset", TINY)
@pytest.mark.parametrize("name", NO_SITES)
def test_methods_without_sites_are_the_plain_model(tiny, preset, name):
    """full, bitfit, head and manual only label: the model they build is the plain one, its
    initialisation the plain one's, and nothing of it changes before training."""
    cfg, plain, base = tiny(preset, models.Sites())
    method = methods.get(name, cfg)
    assert method.sites == models.Sites() and method.init is None and method.fold is None
    model = models.build(cfg, method.sites)
    assert model == plain
    params = method.initialize(base, ctx(cfg))
    assert params is base
    expected = outputs(cfg, plain, base)
    for key, value in outputs(cfg, model, params).items():
        np.testing.assert_allclose(value, expected[key], atol=1e-6, rtol=0, err_msg=key)


@pytest.mark.parametrize("preset", TINY)
def test_prompt_from_text_equals_that_text_in_front(tiny, preset):
    text_ids = ENCODE(TEXT)
    assert len(text_ids) == P
    cfg, plain, base = tiny(preset, models.Sites())
    method = methods.get("prompt", cfg, length=P, init="text", init_text=TEXT)
    _, model, params = tiny(preset, method.sites)
    params = method.initialize(params, methods.InitContext(jax.random.key(1), cfg.family, ENCODE, ()))
    table = partition.flatten(base)[models.WORD_EMBEDDINGS[cfg.family]]
    np.testing.assert_array_equal(params["prompt"]["embedding"], table[np.array(text_ids)])

    got = outputs(cfg, model, params)
    expected = outputs(cfg, plain, base, *context(text_ids))
    alone = outputs(cfg, plain, base)
    for key in ("hidden", "logits"):        # at x's positions (the prompt's are dropped)
        if key in got:
            assert got[key].shape == alone[key].shape
            np.testing.assert_allclose(got[key][REAL], expected[key][:, P:][REAL], atol=2e-5, rtol=0, err_msg=key)
            assert np.abs(alone[key][REAL] - expected[key][:, P:][REAL]).max() > 1e-3   # the text matters
    # Decoders classify from the last real token, BERT pools the first position: the
    # prompt's first vector there, the text's first token in the plain run.
    np.testing.assert_allclose(got["class"], expected["class"], atol=2e-5, rtol=0)


def _cached_kv(cache):
    """(layers, 2, P, kv_heads * head_dim) from a decode cache {..., <block_i>: {<attn>: {key, value}}}."""
    flat = partition.flatten(cache)
    per_layer = {}
    for path, x in flat.items():
        parts = path.split("/")
        if parts[-1] in ("key", "value"):
            block = parts[1]                                  # h_3 | layers_3
            per_layer.setdefault(int(block.rsplit("_", 1)[1]), {})[parts[-1]] = x
    assert sorted(per_layer) == list(range(len(per_layer)))
    kv = jnp.stack([jnp.stack([per_layer[i]["key"][0], per_layer[i]["value"][0]]) for i in sorted(per_layer)])
    return kv.reshape(kv.shape[:3] + (-1,))


@pytest.mark.parametrize("preset", DECODERS)
def test_prefix_equals_a_kv_cache_of_context(tiny, preset):
    """Direct prefix keys/values set to what the plain model caches for a text t give, on x,
    the plain model's outputs on concat(t, x) at x's positions."""
    t = np.array([ENCODE("abcd")] * 2)
    assert t.shape[1] == P
    cfg, plain, base = tiny(preset, models.Sites())
    cache = models.init_cache(plain, 2, P)
    _, state = plain.apply({"params": base, "cache": cache}, t, np.ones_like(t), np.tile(np.arange(P), (2, 1)),
                           output="hidden", decode=True, mutable=["cache"])
    kv = _cached_kv(state["cache"])
    assert kv.shape == (cfg.num_layers, 2, P, cfg.num_kv_heads * cfg.head_dim)

    method = methods.get("ptuning_v2", cfg, length=P)
    _, model, params = tiny(preset, method.sites)
    assert params["prefix"]["kv"].shape == kv.shape
    params = {**params, "prefix": {"kv": kv}}
    got = outputs(cfg, model, params)
    expected = outputs(cfg, plain, base, *context(t[0]))
    alone = outputs(cfg, plain, base)
    for key in ("hidden", "logits"):
        np.testing.assert_allclose(got[key][REAL], expected[key][:, P:][REAL], atol=1e-5, rtol=0, err_msg=key)
        assert np.abs(alone[key][REAL] - expected[key][:, P:][REAL]).max() > 1e-3   # the context matters
    np.testing.assert_allclose(got["class"], expected["class"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("preset", TINY)
def test_prefix_folding_keeps_outputs(tiny, preset):
    cfg, plain, base = tiny(preset, models.Sites())
    method = methods.get("prefix", cfg, length=P, hidden=16)
    _, model, params = tiny(preset, method.sites)
    folded, sites = method.folded(params, model)
    assert sites.prefix.hidden is None and sites.prefix.length == P
    before = outputs(cfg, model, params)
    after = outputs(cfg, models.build(cfg, sites), folded)
    alone = outputs(cfg, plain, base)
    for key in before:
        np.testing.assert_allclose(after[key], before[key], atol=1e-6, rtol=0, err_msg=key)
    assert np.abs(alone["hidden"][REAL] - before["hidden"][REAL]).max() > 1e-3   # the prefix matters
