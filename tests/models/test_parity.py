"""ptune vs transformers' PyTorch models on random weights, loaded through `ptune.models.hf`."""

import flax.linen as nn
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from ptune import models, partition  # noqa: E402
from ptune.models import hf  # noqa: E402
from ptune.models.sites import LoRA, Prompt, Sites  # noqa: E402

PAD = 0
IDS = np.array([[11, 12, 13, 14, 15, 16], [17, 18, 19, 20, PAD, PAD]], np.int32)
MASK = (IDS != PAD).astype(np.int32)                      # right padding in row 1
REAL = MASK.astype(bool)


def _hf_config(cfg):
    """The transformers config with `cfg`'s hyperparameters (Qwen2 = LLaMA with q/k/v biases)."""
    T = transformers
    common = dict(vocab_size=cfg.vocab_size, pad_token_id=PAD, num_labels=cfg.num_labels or 2)
    if cfg.family == "gpt2":
        return T.GPT2Config(n_positions=cfg.max_positions, n_embd=cfg.hidden_size, n_layer=cfg.num_layers,
                            n_head=cfg.num_heads, n_inner=cfg.intermediate_size, layer_norm_epsilon=cfg.norm_eps,
                            activation_function=cfg.activation, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0,
                            bos_token_id=1, eos_token_id=1, **common)
    if cfg.family == "llama":
        return (T.Qwen2Config if cfg.qkv_bias else T.LlamaConfig)(
            hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads, hidden_act=cfg.activation,
            max_position_embeddings=cfg.max_positions, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
            tie_word_embeddings=cfg.tie_embeddings, bos_token_id=1, eos_token_id=1, **common)
    return T.BertConfig(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                        num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
                        max_position_embeddings=cfg.max_positions, layer_norm_eps=cfg.norm_eps,
                        hidden_act=cfg.activation, hidden_dropout_prob=0, attention_probs_dropout_prob=0, **common)


def _init(model):
    """Random params, run eagerly: the ops' compilations are then shared by every test."""
    return nn.unbox(model.init(jax.random.key(0), IDS, output="hidden")["params"])


def _reference(cfg, hf_class):
    torch.manual_seed(0)
    return getattr(transformers, hf_class)(_hf_config(cfg)).eval()


def _state(reference):
    return {k: v.numpy() for k, v in reference.state_dict().items()}


def _load(cfg, reference):
    model = models.build(cfg)
    return model, hf.from_hf(cfg.family, _state(reference), _init(model))


def _torch(reference):
    with torch.no_grad():
        return reference(torch.tensor(IDS, dtype=torch.long), attention_mask=torch.tensor(MASK))


LM = [("gpt2-tiny", {}, "GPT2LMHeadModel"), ("llama-tiny", {}, "LlamaForCausalLM"),
      ("llama-tiny", {"tie_embeddings": True}, "LlamaForCausalLM"),
      ("llama-tiny", {"qkv_bias": True}, "Qwen2ForCausalLM")]
CLASSIFIERS = [("gpt2-tiny", {"num_labels": 3}, "GPT2ForSequenceClassification"),
               ("llama-tiny", {"num_labels": 3}, "LlamaForSequenceClassification"),
               ("bert-tiny", {"num_labels": 3}, "BertForSequenceClassification")]


@pytest.mark.parametrize("preset,overrides,hf_class", LM)
def test_lm_logits_match_transformers(preset, overrides, hf_class):
    cfg = models.model_config(preset, **overrides)
    reference = _reference(cfg, hf_class)
    model, params = _load(cfg, reference)
    got = np.asarray(model.apply({"params": params}, IDS, MASK, output="logits"))
    assert np.abs(got - _torch(reference).logits.numpy())[REAL].max() < 1e-4


@pytest.mark.parametrize("preset,overrides,hf_class", CLASSIFIERS)
def test_sequence_classification_matches_transformers(preset, overrides, hf_class):
    """Decoders classify from the last real token (HF finds it by the pad id), BERT from the pooler."""
    cfg = models.model_config(preset, **overrides)
    reference = _reference(cfg, hf_class)
    model, params = _load(cfg, reference)
    got = np.asarray(model.apply({"params": params}, IDS, MASK, output="class"))
    assert got.shape == (2, 3)
    assert np.abs(got - _torch(reference).logits.numpy()).max() < 1e-4


def test_bert_hidden_states_match_transformers():
    cfg = models.model_config("bert-tiny")
    reference = _reference(cfg, "BertModel")
    model, params = _load(cfg, reference)
    got = np.asarray(model.apply({"params": params}, IDS, MASK, output="hidden"))
    assert np.abs(got - _torch(reference).last_hidden_state.numpy())[REAL].max() < 1e-4


@pytest.mark.parametrize("preset,overrides,hf_class", LM + CLASSIFIERS + [("bert-tiny", {}, "BertModel")])
def test_state_dict_round_trip_keeps_sites(preset, overrides, hf_class):
    cfg = models.model_config(preset, **overrides)
    reference = _reference(cfg, hf_class)
    sites = Sites(lora=LoRA(2, 4.0, r"(c_attn|q_proj|query)$"), prompt=Prompt(2))
    template = _init(models.build(cfg, sites))
    params = hf.from_hf(cfg.family, _state(reference), template)
    state = {hf.canonical(cfg.family, k): v for k, v in _state(reference).items()}
    back = hf.to_hf(cfg.family, params)
    # Only the LM head may differ: ptune has no copy of a tied one, and a fresh one for a classifier.
    assert set(state) ^ set(back) <= {"lm_head.weight"}
    for key in set(state) & set(back):
        np.testing.assert_array_equal(back[key], state[key])
    for path, value in partition.flatten(params).items():
        if hf.is_site(path):
            np.testing.assert_array_equal(value, partition.flatten(template)[path])


def test_mismatched_checkpoints_are_named():
    cfg = models.model_config("gpt2-tiny")
    state = _state(_reference(cfg, "GPT2LMHeadModel"))
    load = lambda state, **overrides: hf.from_hf(
        "gpt2", state, _init(models.build(models.model_config("gpt2-tiny", **overrides))))
    with pytest.raises(ValueError, match=r"'transformer.h.0.mlp.c_fc.bias' has shape \(256,\) but "
                                         r"ptune transformer/h_0/mlp/c_fc/bias expects \(128,\)"):
        load(state, intermediate_size=128)
    with pytest.raises(ValueError, match=r"lacks transformer.h.1.attn.c_attn.bias, .* and 4 more"):
        load({k: v for k, v in state.items() if ".h.1." not in k})
    with pytest.raises(ValueError, match=r"no parameter for transformer.h.0.extra.weight"):
        load({**state, "h.0.extra.weight": np.zeros(3)})
    with pytest.raises(ValueError, match="LM head is untied; set model.tie_embeddings=False"):
        load({**state, "lm_head.weight": state["lm_head.weight"] + 1})


def test_old_style_bare_checkpoint_loads():
    """Torch tensors, keys without the `bert.` prefix, LayerNorm gamma/beta and a position-ids buffer."""
    cfg = models.model_config("bert-tiny")
    reference = _reference(cfg, "BertModel")
    model, params = _load(cfg, reference)
    old = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
           for k, v in reference.state_dict().items()}
    old["embeddings.position_ids"] = torch.arange(cfg.max_positions)[None]
    jax.tree.map(np.testing.assert_array_equal, hf.from_hf("bert", old, _init(model)), params)
