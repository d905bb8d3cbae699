"""Qwen3 (q/k norms, explicit head_dim), a Llama with an explicit head_dim and Mistral's sliding-window
attention compute what transformers computes: full forward and KV-cached decoding, from HF directories
of random weights; LoRA and IA3 on Qwen3 start as the identity and train; what stays refused is named."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from ptune import methods, models, partition  # noqa: E402
from ptune.models import hf, hf_config, pretrained  # noqa: E402
from decoding import cached_logits  # noqa: E402  (tests/models/decoding.py)

IDS = np.random.default_rng(0).integers(0, 260, (2, 24))
PREFILL, WINDOW = 10, 8     # the window binds in the prefill and in every decoded step
TOL = 1e-5
SHAPE = dict(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)
# transformers' configs: head_dim 32 (Qwen3) and 24 (Llama) differ from hidden_size / heads = 16.
CONFIGS = {
    "qwen3": lambda: transformers.Qwen3Config(**SHAPE, head_dim=32, tie_word_embeddings=True,
                                              rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    "llama-head-dim": lambda: transformers.LlamaConfig(**SHAPE, head_dim=24),
    "mistral-window": lambda: transformers.MistralConfig(**SHAPE, sliding_window=WINDOW),
    "qwen3-window": lambda: transformers.Qwen3Config(**SHAPE, head_dim=32, use_sliding_window=True,
                                                     sliding_window=WINDOW, max_window_layers=0),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """name -> (HF directory, transformers' logits on IDS), each made once."""
    return functools.cache(lambda name: _save(name, tmp_path_factory.mktemp(name)))


def _save(name, path):
    """transformers' model, weights large enough that positions and the window move the logits by O(1)."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[name]()).eval()
    with torch.no_grad():
        for key, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if key.endswith("norm.weight") else 0.08 * torch.randn_like(p))
        want = model(torch.tensor(IDS)).logits.numpy()
    model.save_pretrained(path)
    return path, want


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(checkpoint, name):
    path, want = checkpoint(name)
    cfg, params = pretrained.load(path)
    assert (cfg.head_dim, cfg.qk_norm, cfg.sliding_window) == {
        "qwen3": (32, True, None), "llama-head-dim": (24, False, None), "mistral-window": (16, False, WINDOW),
        "qwen3-window": (32, True, WINDOW)}[name]
    got = np.asarray(models.build(cfg).apply({"params": params}, IDS))
    diff = np.abs(got - want).max()
    print(f"{name}: max |logit diff| {diff:.1e}")
    assert diff <= TOL
    if cfg.sliding_window:   # the test can fail: without the window the logits are far off
        unwindowed = models.build(dataclasses.replace(cfg, sliding_window=None)).apply({"params": params}, IDS)
        assert np.abs(np.asarray(unwindowed) - want)[:, WINDOW:].max() > 1e-2


@pytest.mark.parametrize("name", CONFIGS)
def test_cached_decoding_matches_transformers(checkpoint, name):
    """Prefill past the window, then one token at a time: the cache keeps every slot and the mask hides
    those the window has passed."""
    path, want = checkpoint(name)
    cfg, params = pretrained.load(path)
    model = models.build(cfg)
    mask, positions = np.ones_like(IDS), np.broadcast_to(np.arange(IDS.shape[1]), IDS.shape)
    logits, _ = cached_logits(model, params, IDS, mask, positions, PREFILL)
    diff = np.abs(logits - want).max()
    print(f"{name} cached: max |logit diff| {diff:.1e}")
    assert diff <= TOL


def test_windowed_rows_pad_and_pack_as_if_alone(checkpoint):
    """The window counts slots; a segment's slots are consecutive, so a left-padded row and a row packing
    two examples see, in each example, the keys it would see alone."""
    path, want = checkpoint("mistral-window")
    cfg, params = pretrained.load(path)
    apply = jax.jit(models.build(cfg).apply)
    a, b = IDS[0, :14], IDS[1, :10]
    alone = [np.asarray(apply({"params": params}, x[None]))[0] for x in (a, b)]
    np.testing.assert_allclose(alone[0], want[0, :14], atol=TOL)
    packed = np.asarray(apply({"params": params}, np.concatenate([a, b])[None],
                              np.repeat([1, 2], [14, 10])[None]))[0]
    padded = np.asarray(apply({"params": params}, np.pad(b, (4, 0))[None], np.pad(np.ones(10, int), (4, 0))[None]))
    assert np.abs(packed - np.concatenate(alone)).max() <= TOL
    assert np.abs(padded[0, 4:] - alone[1]).max() <= TOL


def test_qwen3_default_targets_are_pefts():
    """PEFT's tables: LoRA's q_proj/v_proj as for Llama, but IA3 scales Qwen's queries, not its keys."""
    cfg = models.model_config("qwen3-tiny")
    assert cfg.model_type == "qwen3"
    assert models.DEFAULT_TARGETS["qwen3"]["lora"] == ["q_proj", "v_proj"]
    assert models.DEFAULT_TARGETS["qwen3"]["ia3"] == ["q_proj", "v_proj", "down_proj"]
    assert models.DEFAULT_TARGETS["llama"]["ia3"] == ["k_proj", "v_proj", "down_proj"]
    peft = pytest.importorskip("peft.utils.constants")
    for model_type in ("llama", "mistral", "qwen2", "qwen3"):
        targets = models.DEFAULT_TARGETS[model_type]
        assert targets["lora"] == peft.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[model_type]
        assert targets["ia3"] == peft.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING[model_type]
        assert targets["ia3_feedforward"] == peft.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING[model_type]


@pytest.mark.parametrize("name", ["lora", "ia3"])
def test_qwen3_method_starts_as_identity_and_trains(checkpoint, name):
    path, _ = checkpoint("qwen3")
    base_cfg, base = pretrained.load(path)
    method = methods.get(name, base_cfg)
    cfg, params = pretrained.load(path, method.sites)
    model = models.build(cfg, method.sites)
    want = jax.jit(models.build(cfg).apply)({"params": base}, IDS)
    got = jax.jit(model.apply)({"params": params}, IDS)
    # LoRA adds x A B with B = 0, IA3 scales by 1: the same logits up to how XLA fuses the two graphs
    assert np.abs(np.asarray(got) - np.asarray(want)).max() <= TOL
    trainable, frozen = partition.split(params, method.labels(params))
    assert partition.flatten(trainable)

    @jax.jit
    def step(trainable):
        def loss(trainable):
            logits = model.apply({"params": partition.merge(frozen, trainable)}, IDS[:, :-1])
            return -jnp.take_along_axis(jax.nn.log_softmax(logits), IDS[:, 1:, None], -1).mean()
        value, grads = jax.value_and_grad(loss)(trainable)
        return value, jax.tree.map(lambda p, g: p - 0.5 * g, trainable, grads)
    before, trained = step(trainable)
    assert step(trained)[0] < before - 1e-4


REFUSED = [
    ({"model_type": "qwen3", "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1},
     r"qwen3 use_sliding_window=True .*one window on every layer"),
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 8,
      "layer_types": ["full_attention", "sliding_attention"]}, r"qwen2 use_sliding_window=True"),
    ({"model_type": "qwen3", "layer_types": ["full_attention", "chunked_attention"]},
     r"qwen3 layer_types=\['full_attention', 'chunked_attention'\]"),
    ({"model_type": "qwen3", "attention_bias": True}, r"qwen3 attention_bias=True"),
    ({"model_type": "mistral", "sliding_window": 0}, r"model.sliding_window=0 must be an integer >= 1"),
    ({"model_type": "mistral", "sliding_window": "8"}, r"model.sliding_window='8' must be an integer >= 1"),
]


@pytest.mark.parametrize("changes,match", REFUSED)
def test_what_stays_refused_is_named(changes, match):
    with pytest.raises(ValueError, match=match):
        hf_config.config_from_hf({**hf_config.config_to_hf(models.model_config("llama-tiny")), **changes})


def test_model_config_refusals():
    with pytest.raises(ValueError, match=r"model.sliding_window applies to the llama family, not gpt2"):
        models.model_config("gpt2-tiny", sliding_window=8)
    with pytest.raises(ValueError, match=r"model.head_dim applies to the llama family, not bert"):
        models.model_config("bert-tiny", head_dim=32)
    with pytest.raises(ValueError, match=r"model.qk_norm applies to the llama family"):
        models.model_config("gpt2-tiny", qk_norm=True)
    with pytest.raises(ValueError, match=r"qk_norm with qkv_bias has no HF model type"):
        hf_config.config_to_hf(models.model_config("qwen3-tiny", qkv_bias=True))


EXPORTED = {"qwen3": {}, "qwen3-window": {"sliding_window": 8},
            "qwen2-window": {"qk_norm": False, "qkv_bias": True, "sliding_window": 8},
            "mistral-head-dim": {"qk_norm": False, "head_dim": 24, "sliding_window": 8}}


@pytest.mark.parametrize("overrides", EXPORTED.values(), ids=EXPORTED)
def test_exported_configs_round_trip_and_transformers_builds_the_same_shapes(overrides):
    cfg = models.model_config("qwen3-tiny", **overrides)
    exported = hf_config.config_to_hf(cfg)
    assert hf_config.config_from_hf(exported) == cfg
    reference = getattr(transformers, exported["architectures"][0])(transformers.AutoConfig.for_model(**exported))
    ptune = partition.flatten(nn.unbox(models.abstract_params(models.build(cfg))))
    shapes = {hf.hf_key(p): tuple(x.shape[::-1]) if hf.transposed("llama", p) else tuple(x.shape)
              for p, x in ptune.items()}
    assert shapes == {k: tuple(v.shape) for k, v in reference.state_dict().items() if k in shapes}
    assert set(reference.state_dict()) - set(shapes) <= {"lm_head.weight"}
    assert getattr(reference.config, "sliding_window", None) == cfg.sliding_window
