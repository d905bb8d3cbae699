"""ptune vs transformers' PyTorch models on random weights, loaded through the HF key mapping."""

import dataclasses

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from ptune import models  # noqa: E402
from ptune.models import hf  # noqa: E402

IDS = np.array([[11, 12, 13, 14, 15, 16], [17, 18, 19, 20, 21, 22]])
MASK = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])          # right padding in row 1
REAL = MASK.astype(bool)


def _hf_config(cfg, num_labels=0):
    T = transformers
    common = dict(vocab_size=cfg.vocab_size, pad_token_id=0, num_labels=max(num_labels, 2))
    if cfg.family == "gpt2":
        return T.GPT2Config(n_positions=cfg.max_positions, n_embd=cfg.hidden_size, n_layer=cfg.num_layers,
                            n_head=cfg.num_heads, n_inner=cfg.intermediate_size, layer_norm_epsilon=cfg.norm_eps,
                            activation_function=cfg.activation, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0,
                            bos_token_id=1, eos_token_id=1, **common)
    if cfg.family == "llama":
        return T.LlamaConfig(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                             num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                             num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=cfg.max_positions,
                             rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
                             tie_word_embeddings=cfg.tie_embeddings, bos_token_id=1, eos_token_id=1, **common)
    return T.BertConfig(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                        num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
                        max_position_embeddings=cfg.max_positions, layer_norm_eps=cfg.norm_eps,
                        hidden_dropout_prob=0, attention_probs_dropout_prob=0, **common)


def _pair(cfg, hf_class):
    torch.manual_seed(0)
    reference = hf_class(_hf_config(cfg, cfg.num_labels)).eval()
    model = models.build(cfg)
    state = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
    return reference, model, hf.from_hf(cfg.family, state, models.init(model, jax.random.key(0)))


def _torch(reference, **kw):
    with torch.no_grad():
        return reference(torch.tensor(IDS), attention_mask=torch.tensor(MASK), **kw)


CAUSAL = [("gpt2-tiny", {}, "GPT2LMHeadModel"), ("llama-tiny", {}, "LlamaForCausalLM"),
          ("llama-tiny", {"tie_embeddings": True}, "LlamaForCausalLM"),
          ("llama-tiny", {"qkv_bias": True}, "Qwen2ForCausalLM")]


@pytest.mark.parametrize("preset,overrides,hf_class", CAUSAL)
def test_lm_logits_match_transformers(preset, overrides, hf_class):
    cfg = models.model_config(preset, **overrides)
    if hf_class == "Qwen2ForCausalLM":   # Qwen2 = LLaMA with q/k/v biases
        reference = _qwen2(cfg)
        model = models.build(cfg)
        state = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
        params = hf.from_hf("llama", state, models.init(model, jax.random.key(0)))
    else:
        reference, model, params = _pair(cfg, getattr(transformers, hf_class))
    expected = _torch(reference).logits.numpy()
    got = np.asarray(model.apply({"params": params}, IDS, MASK))
    assert np.abs(got - expected)[REAL].max() < 1e-4


def _qwen2(cfg):
    torch.manual_seed(0)
    c = _hf_config(dataclasses.replace(cfg, qkv_bias=False)).to_dict()
    c.pop("model_type", None), c.pop("architectures", None)
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**c)).eval()


@pytest.mark.parametrize("preset,hf_class", [("gpt2-tiny", "GPT2ForSequenceClassification"),
                                             ("llama-tiny", "LlamaForSequenceClassification"),
                                             ("bert-tiny", "BertForSequenceClassification")])
def test_sequence_classification_matches_transformers(preset, hf_class):
    cfg = models.model_config(preset, num_labels=3)
    reference, model, params = _pair(cfg, getattr(transformers, hf_class))
    ids = IDS.copy()
    ids[1, 4:] = 0      # HF decoders find the last token by the pad id; ptune by the mask
    with torch.no_grad():
        expected = reference(torch.tensor(ids), attention_mask=torch.tensor(MASK)).logits.numpy()
    got = np.asarray(model.apply({"params": params}, ids, MASK, output="class"))
    assert np.abs(got - expected).max() < 1e-4


def test_bert_hidden_states_match_transformers():
    cfg = models.model_config("bert-tiny")
    reference, model, params = _pair(cfg, transformers.BertModel)
    expected = _torch(reference).last_hidden_state.numpy()
    got = np.asarray(model.apply({"params": params}, IDS, MASK, output="hidden"))
    assert np.abs(got - expected)[REAL].max() < 1e-4


@pytest.mark.parametrize("preset,hf_class", [("gpt2-tiny", "GPT2LMHeadModel"), ("llama-tiny", "LlamaForCausalLM"),
                                             ("bert-tiny", "BertModel")])
def test_state_dict_round_trip(preset, hf_class):
    reference, _, params = _pair(models.model_config(preset), getattr(transformers, hf_class))
    state = {hf._normalize(models.model_config(preset).family, k): v.numpy()
             for k, v in reference.state_dict().items() if not hf.IGNORED.search(k)}
    back = hf.to_hf(models.model_config(preset).family, params)
    assert set(back) == set(state) - ({"lm_head.weight"} if preset == "gpt2-tiny" else set())
    for key, value in back.items():
        np.testing.assert_array_equal(value, state[key])


def test_mismatched_checkpoint_names_key_and_shapes():
    reference, _, _ = _pair(models.model_config("gpt2-tiny"), transformers.GPT2LMHeadModel)
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    bigger = models.build(models.model_config("gpt2-tiny", intermediate_size=128))
    with pytest.raises(ValueError, match=r"'transformer.h.0.mlp.c_fc.bias' has shape \(256,\) but "
                                         r"ptune transformer/h_0/mlp/c_fc/bias expects \(128,\)"):
        hf.from_hf("gpt2", state, models.init(bigger, jax.random.key(0)))
    state["transformer.h.0.extra.weight"] = np.zeros(3)
    with pytest.raises(ValueError, match="ptune does not know"):
        hf.from_hf("gpt2", state, models.init(models.build(models.model_config("gpt2-tiny")), jax.random.key(0)))
