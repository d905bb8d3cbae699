"""RoPE scaling (linear, llama3, yarn) computes what transformers computes, from HF directories
and GGUF files; config fields and GGUF contents ptune cannot honour are refused by name."""

import dataclasses
import json
import math

import gguf
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from ptune import assets, models  # noqa: E402
from ptune.models import hf_config, pretrained, rope_scaling  # noqa: E402
from decoding import cached_logits  # noqa: E402  (tests/models/decoding.py)

CONTEXT = 32                                           # original_max_position_embeddings
IDS = np.random.default_rng(0).integers(0, 260, (2, 40))   # 40 tokens: past CONTEXT
PREFILL = 24
# Llama 3.2's llama3 scaling (factor 32) on a tiny Llama-3.2-shaped model (GQA, tied embeddings).
# rope_theta 10000 and head_dim 32 with CONTEXT 32 put frequencies in all three llama3 bands.
SCALINGS = {"llama3": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": CONTEXT},
            "linear": {"rope_type": "linear", "factor": 4.0},
            "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": CONTEXT}}


def _reference(rope: dict, **fields):
    """transformers' Llama with `rope`, weights large enough that positions move the logits by O(1)."""
    config = transformers.LlamaConfig(vocab_size=260, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      tie_word_embeddings=True, rope_parameters={"rope_theta": 10000.0, **rope},
                                      **fields)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.08 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=list(SCALINGS))
def checkpoint(request, tmp_path_factory):
    """(HF directory, transformers' model, its logits on IDS) for each rope type."""
    model = _reference(SCALINGS[request.param])
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    with torch.no_grad():
        return path, model, model(torch.tensor(IDS)).logits.numpy()


def test_llama3_bands_are_all_used():
    """High frequencies kept, low ones divided by the factor, some smoothed between: the parity tests
    below test every branch of the llama3 rule."""
    inv, _ = rope_scaling.frequencies(32, 10000.0, rope_scaling.normalise(SCALINGS["llama3"]), 128)
    ratio = rope_scaling.frequencies(32, 10000.0, (), 128)[0] / inv
    assert np.isclose(ratio, 1).any() and np.isclose(ratio, 32).any() and ((ratio > 1.01) & (ratio < 31.9)).any()


def test_logits_match_transformers(checkpoint):
    path, reference, want = checkpoint
    cfg, params = pretrained.load(path)
    assert dict(cfg.rope_scaling)["rope_type"] == reference.config.rope_parameters["rope_type"]
    inv, scale = rope_scaling.frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_positions)
    np.testing.assert_allclose(inv, reference.model.rotary_emb.inv_freq.numpy(), rtol=2e-7)
    assert scale == reference.model.rotary_emb.attention_scaling
    got = np.asarray(models.build(cfg).apply({"params": params}, IDS))
    assert np.abs(got - want).max() <= 1e-5


def test_cached_decoding_matches_transformers(checkpoint):
    """Prefill inside the original context, then one token at a time past it."""
    path, _, want = checkpoint
    cfg, params = pretrained.load(path)
    model = models.build(cfg)
    mask, positions = np.ones_like(IDS), np.broadcast_to(np.arange(IDS.shape[1]), IDS.shape)
    logits, _ = cached_logits(model, params, IDS, mask, positions, PREFILL)
    assert np.abs(logits - want).max() <= 1e-5


@pytest.mark.parametrize("name", SCALINGS)
def test_exported_config_round_trips_and_transformers_reads_the_same_frequencies(name):
    cfg = models.model_config("llama-tiny", rope_scaling=SCALINGS[name], rope_theta=500000.0)
    exported = hf_config.config_to_hf(cfg)
    assert hf_config.config_from_hf(exported) == cfg
    assert hf_config.config_from_hf(json.loads(json.dumps(exported))) == cfg
    hf = transformers.AutoConfig.for_model(**exported)
    rotary = transformers.LlamaForCausalLM(hf).model.rotary_emb
    inv, scale = rope_scaling.frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_positions)
    np.testing.assert_allclose(inv, rotary.inv_freq.numpy(), rtol=2e-7)   # float32 pow: an ulp at most
    assert scale == rotary.attention_scaling


# ------------------------------------------------------------------------------------------ GGUF

_TO_GGUF = {v: k for k, v in pretrained._GGUF_NAMES.items()}


def _gguf_name(key: str) -> str:
    module, leaf = key.rsplit(".", 1)                   # model.layers.0.self_attn.q_proj | model.norm
    if module.startswith("model.layers."):
        _, _, layer, rest = module.split(".", 3)
        return f"blk.{layer}.{_TO_GGUF[rest]}.{leaf}"
    return f"{_TO_GGUF[module]}.{leaf}"


def _llama_cpp_rope_freqs(head_dim, theta, p):
    """llama.cpp's convert_hf_to_gguf.py for Llama 3.x: one divisor per frequency."""
    factor, low, high, context = (p["factor"], p["low_freq_factor"], p["high_freq_factor"],
                                  p["original_max_position_embeddings"])
    out = []
    for freq in 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim):
        wavelen = 2 * math.pi / freq
        smooth = (context / wavelen - low) / (high - low)
        out.append(1 if wavelen < context / high else factor if wavelen > context / low
                   else 1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, np.float32)


def _write_gguf(path, model, arch="llama", meta=(), extra=(), raw_type=None):
    """A GGUF file of transformers' `model` as llama.cpp writes one: Q/K rows interleaved per head."""
    c = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    for add, value in (("block_count", c.num_hidden_layers), ("context_length", c.max_position_embeddings),
                       ("embedding_length", c.hidden_size), ("feed_forward_length", c.intermediate_size),
                       ("head_count", c.num_attention_heads), ("head_count_kv", c.num_key_value_heads),
                       ("layer_norm_rms_eps", c.rms_norm_eps), ("rope_freq_base", c.rope_parameters["rope_theta"]),
                       ("vocab_size", c.vocab_size), ("rope_dimension_count", c.head_dim),
                       ("key_length", c.head_dim), ("value_length", c.head_dim)):
        getattr(writer, f"add_{add}")(value)
    for key, value in meta:
        writer.add_key_value(key, value[0], value[1])
    for key, w in model.state_dict().items():
        w = w.numpy()
        if key == "lm_head.weight":
            continue                                   # tied: GGUF has token_embd only
        if key.endswith(("q_proj.weight", "k_proj.weight")):
            heads = c.num_attention_heads if "q_proj" in key else c.num_key_value_heads
            w = w.reshape(heads, 2, w.shape[0] // heads // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)
        if raw_type is None:
            writer.add_tensor(_gguf_name(key), np.ascontiguousarray(w))
        else:                                          # bytes of a type the gguf package cannot dequantize
            block, size = gguf.GGML_QUANT_SIZES[raw_type]
            shape = w.shape[:-1] + (w.shape[-1] // block * size,)
            writer.add_tensor(_gguf_name(key), np.zeros(shape, np.uint8), raw_dtype=raw_type)
    for name, w in extra:
        writer.add_tensor(name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_llama3_gguf_rope_freqs_give_transformers_logits(tmp_path):
    model = _reference(SCALINGS["llama3"])
    rope_freqs = _llama_cpp_rope_freqs(model.config.head_dim, 10000.0, SCALINGS["llama3"])
    path = _write_gguf(tmp_path / "llama3.gguf", model, extra=[("rope_freqs.weight", rope_freqs)])
    cfg, params = pretrained.load(path)
    assert cfg.rope_scaling == rope_scaling.normalise(SCALINGS["llama3"])
    with torch.no_grad():
        want = model(torch.tensor(IDS)).logits.numpy()
    assert np.abs(np.asarray(models.build(cfg).apply({"params": params}, IDS)) - want).max() <= 1e-5


@pytest.mark.parametrize("head_dim,factor", [(64, 32.0), (128, 8.0)])   # Llama 3.2 1B, Llama 3.1 8B
def test_published_llama3_rope_freqs_are_recognised(head_dim, factor):
    params = {**SCALINGS["llama3"], "factor": factor, "original_max_position_embeddings": 8192}
    divisors = _llama_cpp_rope_freqs(head_dim, 500000.0, params)
    assert rope_scaling.llama3_from_divisors(divisors, head_dim, 500000.0) == rope_scaling.normalise(params)
    assert rope_scaling.llama3_from_divisors(np.ones(head_dim // 2), head_dim, 500000.0) == ()


def test_gguf_head_dim_is_read(tmp_path):
    """llama.attention.key_length is the head width, which may differ from hidden / heads (Mistral Nemo)."""
    model = _reference(SCALINGS["llama3"], head_dim=48)
    rope_freqs = _llama_cpp_rope_freqs(48, 10000.0, SCALINGS["llama3"])
    cfg, params = pretrained.load(_write_gguf(tmp_path / "head-dim.gguf", model,
                                              extra=[("rope_freqs.weight", rope_freqs)]))
    assert cfg.head_dim == 48 and cfg.rope_scaling == rope_scaling.normalise(SCALINGS["llama3"])
    with torch.no_grad():
        want = model(torch.tensor(IDS)).logits.numpy()
    assert np.abs(np.asarray(models.build(cfg).apply({"params": params}, IDS)) - want).max() <= 1e-5


def test_linear_gguf_scaling_is_read(tmp_path):
    meta = [("llama.rope.scaling.type", ("linear", gguf.GGUFValueType.STRING)),
            ("llama.rope.scaling.factor", (4.0, gguf.GGUFValueType.FLOAT32))]
    cfg, _ = pretrained.load(_write_gguf(tmp_path / "linear.gguf", _reference({}), meta=meta))
    assert cfg.rope_scaling == (("factor", 4.0), ("rope_type", "linear"))


def test_gguf_refusals(tmp_path):
    model = _reference({})
    cases = [
        (dict(arch="qwen2"), r"GGUF architecture 'qwen2' is not supported; ptune reads only 'llama'"),
        (dict(raw_type=gguf.GGMLQuantizationType.Q8_1), r"quantised as Q8_1, which ptune cannot dequantize"),
        (dict(extra=[("rope_freqs.weight", np.linspace(1, 3, 16, dtype=np.float32))]),
         r"GGUF tensor rope_freqs holds per-frequency RoPE divisors that are no llama3 scaling"),
        (dict(extra=[("blk.0.attn_q_norm.weight", np.ones(32, np.float32))]), r"GGUF tensor\(s\) blk.0.attn_q_norm"),
        (dict(meta=[("llama.attention.sliding_window", (16, gguf.GGUFValueType.UINT32))]),
         r"GGUF metadata llama.attention.sliding_window unknown to ptune"),
        (dict(meta=[("llama.rope.scaling.type", ("yarn", gguf.GGUFValueType.STRING))]),
         r"llama.rope.scaling.type='yarn' is not implemented"),
        (dict(meta=[("llama.expert_count", (8, gguf.GGUFValueType.UINT32))]), r"llama.expert_count=8"),
    ]
    for i, (kwargs, match) in enumerate(cases):
        with pytest.raises(ValueError, match=match):
            pretrained.load(_write_gguf(tmp_path / f"bad{i}.gguf", model, **kwargs))


# ----------------------------------------------------------------------------- config.json fields

@pytest.mark.parametrize("cls", ["LlamaConfig", "Qwen2Config", "Qwen3Config", "MistralConfig", "GPT2Config",
                                 "BertConfig"])
def test_configs_transformers_writes_load(tmp_path, cls):
    config = getattr(transformers, cls)()
    config.save_pretrained(tmp_path)
    hf_config.config_from_hf(json.loads((tmp_path / "config.json").read_text()))
    hf_config.config_from_hf(json.loads(config.to_json_string(use_diff=False)))   # every field written


def test_published_configs_load():
    """Llama 3.2 (transformers 4's rope_scaling), SmolLM2 (nanotron's extra fields), Qwen2.5 (an unused
    sliding window), MiniLM as shipped, and the shipped SmolLM2 GGUF's config exported."""
    llama32 = dict(architectures=["LlamaForCausalLM"], attention_bias=False, attention_dropout=0.0, bos_token_id=128000,
                   eos_token_id=128001, head_dim=64, hidden_act="silu", hidden_size=2048, initializer_range=0.02,
                   intermediate_size=8192, max_position_embeddings=131072, mlp_bias=False, model_type="llama",
                   num_attention_heads=32, num_hidden_layers=16, num_key_value_heads=8, pretraining_tp=1,
                   rms_norm_eps=1e-05, rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                   rope_theta=500000.0, tie_word_embeddings=True, torch_dtype="bfloat16",
                   transformers_version="4.45.0.dev0", use_cache=True, vocab_size=128256)
    cfg = hf_config.config_from_hf(llama32)
    assert dict(cfg.rope_scaling)["factor"] == 32.0 and cfg.rope_theta == 500000.0
    smollm2 = dict(architectures=["LlamaForCausalLM"], attention_bias=False, attention_dropout=0.0, bos_token_id=0,
                   eos_token_id=0, hidden_act="silu", hidden_size=576, initializer_range=0.041666666666666664,
                   intermediate_size=1536, is_llama_config=True, max_position_embeddings=8192, model_type="llama",
                   num_attention_heads=9, num_hidden_layers=30, num_key_value_heads=3, pretraining_tp=1,
                   rms_norm_eps=1e-05, rope_interleaved=False, rope_scaling=None, rope_theta=100000,
                   tie_word_embeddings=True, torch_dtype="bfloat16", transformers_version="4.40.1", use_cache=True,
                   vocab_size=49152)
    assert hf_config.config_from_hf(smollm2) == models.model_config("smollm2-135m")
    qwen25 = dict(architectures=["Qwen2ForCausalLM"], attention_dropout=0.0, bos_token_id=151643,
                  eos_token_id=151643, hidden_act="silu", hidden_size=896, initializer_range=0.02,
                  intermediate_size=4864, max_position_embeddings=32768, max_window_layers=24, model_type="qwen2",
                  num_attention_heads=14, num_hidden_layers=24, num_key_value_heads=2, rms_norm_eps=1e-06,
                  rope_theta=1000000.0, sliding_window=32768, tie_word_embeddings=True, torch_dtype="bfloat16",
                  transformers_version="4.43.1", use_cache=True, use_mrope=False, use_sliding_window=False,
                  vocab_size=151936)
    assert hf_config.config_from_hf(qwen25).qkv_bias
    hf_config.config_from_hf(json.loads((assets.ensure("minilm") / "config.json").read_text()))
    hf_config.config_from_hf(transformers.MistralConfig(sliding_window=None).to_dict())
    gguf_config, _ = pretrained.read(assets.ensure("smollm2"))
    cfg = hf_config.config_from_hf(gguf_config)
    assert hf_config.config_from_hf(hf_config.config_to_hf(cfg)) == cfg


def _base(preset, **overrides):
    return hf_config.config_to_hf(models.model_config(preset, **overrides))


REFUSED = [
    ("llama-tiny", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, r"rope_type 'dynamic' \(NTK"),
    ("llama-tiny", {"rope_scaling": {"type": "longrope", "short_factor": [1], "long_factor": [2]}},
     r"rope_scaling: rope_type 'longrope'"),
    ("llama-tiny", {"rope_scaling": {"rope_type": "proportional"}}, r"rope_type 'proportional' is not implemented"),
    ("llama-tiny", {"rope_scaling": {"rope_type": "linear", "factor": 2.0, "alpha": 1}},
     r"rope_type 'linear': parameter\(s\) \['alpha'\] not implemented"),
    ("llama-tiny", {"partial_rotary_factor": 0.5}, r"partial_rotary_factor=0.5"),
    ("llama-tiny", {"attention_bias": True}, r"llama attention_bias=True changes what the model computes"),
    ("llama-tiny", {"mlp_bias": True}, r"mlp_bias=True"),
    ("llama-tiny", {"hidden_act": "relu2"}, r"hidden_act='relu2' is not implemented"),
    ("llama-tiny", {"attn_logit_softcapping": 50.0}, r"field\(s\) attn_logit_softcapping unknown to ptune"),
    ("llama-tiny", {"final_logit_softcapping": 30.0, "quantization_config": {"quant_method": "gptq"}},
     r"field\(s\) final_logit_softcapping, quantization_config unknown"),
    ("llama-tiny", {"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 64, "max_window_layers": 1},
     r"qwen2 use_sliding_window=True"),   # a window on some layers only
    ("llama-tiny", {"model_type": "qwen2", "use_mrope": True}, r"qwen2 use_mrope=True"),
    ("gpt2-tiny", {"scale_attn_by_inverse_layer_idx": True}, r"gpt2 scale_attn_by_inverse_layer_idx=True"),
    ("gpt2-tiny", {"add_cross_attention": True}, r"add_cross_attention=True"),
    ("bert-tiny", {"position_embedding_type": "relative_key"}, r"position_embedding_type='relative_key'"),
    ("bert-tiny", {"is_decoder": True}, r"bert is_decoder=True"),
    ("bert-tiny", {"is_encoder_decoder": True}, r"is_encoder_decoder=True"),
    ("llama-tiny", {"model_type": "gemma2"},
     r"unknown architecture model_type='gemma2'; ptune loads \['bert', 'gpt2', 'llama', 'mistral', 'qwen2', 'qwen3'\]"),
]


@pytest.mark.parametrize("preset,changes,match", REFUSED, ids=[next(iter(c)) for _, c, _ in REFUSED])
def test_fields_ptune_cannot_honour_are_refused(preset, changes, match):
    with pytest.raises(ValueError, match=match):
        hf_config.config_from_hf({**_base(preset), **changes})


def test_a_missing_field_is_named():
    config = _base("llama-tiny")
    del config["intermediate_size"]
    with pytest.raises(ValueError, match=r"llama config lacks the field 'intermediate_size'"):
        hf_config.config_from_hf(config)


def test_honoured_variants_load():
    """What the checks accept: windows (those that never bind read as none), a bias-free Llama, any head_dim."""
    assert hf_config.config_from_hf({**_base("llama-tiny"), "model_type": "mistral", "sliding_window": 128}) == \
        models.model_config("llama-tiny")
    assert hf_config.config_from_hf({**_base("llama-tiny"), "model_type": "mistral", "sliding_window": 64}
                                    ).sliding_window == 64
    assert hf_config.config_from_hf({**_base("llama-tiny"), "model_type": "mistral", "max_position_embeddings": 8192}
                                    ).sliding_window == 4096   # transformers' default window
    assert hf_config.config_from_hf({**_base("llama-tiny"), "head_dim": 32}).head_dim == 32
    assert hf_config.config_from_hf({**_base("llama-tiny"), "model_type": "qwen2", "use_sliding_window": True,
                                     "sliding_window": 64, "max_window_layers": 2})   # no sliding layer
    cfg = models.model_config("llama-tiny")
    assert hf_config.config_from_hf({**_base("llama-tiny"), "attention_bias": False, "head_dim": 16}) == cfg
    # a config's own rope_parameters theta wins over a top-level one, as in transformers 5
    both = {**_base("llama-tiny"), "rope_theta": 1.0, "rope_parameters": {"rope_type": "default", "rope_theta": 7.0}}
    assert hf_config.config_from_hf(both) == dataclasses.replace(cfg, rope_theta=7.0)


def test_rope_scaling_in_model_config_is_checked():
    with pytest.raises(ValueError, match=r"model.rope_scaling: rope_type 'dynamic'"):
        models.model_config("llama-tiny", rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ValueError, match=r"rope_type 'linear': factor='2' must be a number > 0"):
        models.model_config("llama-tiny", rope_scaling={"rope_type": "linear", "factor": "2"})
    with pytest.raises(ValueError, match=r"rope_scaling applies to the llama family"):
        models.model_config("gpt2-tiny", rope_scaling={"rope_type": "linear", "factor": 2.0})
    assert models.model_config("llama-tiny", rope_scaling=[["rope_type", "linear"], ["factor", 2.0]]).rope_scaling == (
        ("factor", 2.0), ("rope_type", "linear"))
