"""HF config.json dicts <-> ModelConfig, and the config.json fields each model type understands.

Correct or refused, never silently wrong: each field of a config.json is
- UNDERSTOOD: read into the ModelConfig (or, for its model type, known to change nothing ptune models),
- CHECKED: it changes the numerics and ptune computes only the values its check accepts
  (transformers' default is used where the field is absent); other values are refused by name,
- METADATA: names, token ids, generation defaults, storage dtype, dropout (training only; see the
  dropout part of issue 23): known not to change what the model computes.
Any other field is refused by name as well. A field ptune does not know may change the numerics
(quantization_config, a new attention variant...): refusing costs one line, guessing costs wrong logits.
"""

from __future__ import annotations

from ptune.errors import UserError
from ptune.models import rope_scaling
from ptune.models.model_config import ModelConfig
from ptune.models.ops import ACTIVATIONS

# HF `model_type` -> ptune family.
HF_FAMILIES = {"gpt2": "gpt2", "llama": "llama", "qwen2": "llama", "qwen3": "llama", "mistral": "llama",
               "bert": "bert"}

METADATA = frozenset({
    "_name_or_path", "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "use_bfloat16",
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id", "forced_bos_token_id",
    "forced_eos_token_id", "id2label", "label2id", "num_labels", "problem_type", "finetuning_task", "tokenizer_class",
    "prefix", "task_specific_params", "use_cache", "initializer_range", "return_dict", "output_attentions",
    "output_hidden_states", "torchscript", "tf_legacy_loss", "gradient_checkpointing", "chunk_size_feed_forward",
    "cross_attention_hidden_size", "tie_encoder_decoder", "pretraining_tp",   # tp only split the same matmuls
    "is_llama_config",                                                        # nanotron's (SmolLM2) marker
    # generation defaults
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty",
    "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens",
    # dropout: training only
    "attention_dropout", "hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout", "attn_pdrop",
    "embd_pdrop", "resid_pdrop", "summary_first_dropout"})

_LLAMA = frozenset({"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                    "intermediate_size", "max_position_embeddings", "rms_norm_eps", "hidden_act", "rope_theta",
                    "rope_parameters", "rope_scaling", "partial_rotary_factor", "original_max_position_embeddings",
                    "tie_word_embeddings", "head_dim"})
_QWEN_WINDOWS = frozenset({"sliding_window", "max_window_layers"})   # read by use_sliding_window's check
UNDERSTOOD = {
    "gpt2": frozenset({"vocab_size", "n_embd", "n_layer", "n_head", "n_inner", "n_positions",
                       "n_ctx",                       # old configs' copy of n_positions
                       "layer_norm_epsilon", "activation_function", "tie_word_embeddings",
                       "reorder_and_upcast_attn",     # the same attention, computed in float32 (ptune does)
                       # GPT2DoubleHeadsModel's multiple-choice head, which ptune does not model
                       "summary_type", "summary_use_proj", "summary_activation", "summary_proj_to_labels"}),
    "llama": _LLAMA, "mistral": _LLAMA | {"sliding_window"}, "qwen2": _LLAMA | _QWEN_WINDOWS,
    "qwen3": _LLAMA | _QWEN_WINDOWS,
    "bert": frozenset({"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                       "max_position_embeddings", "layer_norm_eps", "hidden_act", "type_vocab_size",
                       "tie_word_embeddings"}),   # ties BERT's masked-LM head, which ptune does not model
}


def layer_windows(c: dict) -> list:
    """Each layer's sliding window as transformers applies it (None: full attention). Mistral's
    `sliding_window` is every layer's; Qwen2's and Qwen3's only with use_sliding_window, on the layers
    layer_types names (else those from max_window_layers on). A window no shorter than the context never
    hides a key, so it is None here too."""
    if c["model_type"] == "mistral":
        window, layers = c.get("sliding_window", 4096), ["sliding_attention"] * c["num_hidden_layers"]
    elif c["model_type"] in ("qwen2", "qwen3"):
        window = c.get("sliding_window", 4096) if c.get("use_sliding_window", False) else None
        layers = c.get("layer_types") or ["sliding_attention" if i >= c.get("max_window_layers", 28)
                                          else "full_attention" for i in range(c["num_hidden_layers"])]
    else:
        return [None] * c["num_hidden_layers"]
    # a window that is no integer binds: ModelConfig then refuses it by name
    binds = window is not None and (not isinstance(window, int) or window < c["max_position_embeddings"])
    return [window if binds and kind == "sliding_attention" else None for kind in layers]


_OFF = (False, lambda v, c: not v, "off")
# ptune gives every layer the same window (ModelConfig.sliding_window), or none.
_ONE_WINDOW = (False, lambda v, c: len(set(layer_windows(c))) == 1,
               "with one window on every layer (a window shorter than max_position_embeddings on some layers "
               "only, as layer_types or max_window_layers say, is not implemented)")
_LAYER_TYPES = (None, lambda v, c: set(v or ()) <= {"full_attention", "sliding_attention"},
                "full_attention and sliding_attention")
# model type -> {field: (transformers' default, accepted(value, config), what ptune implements)}.
CHECKED = {
    "gpt2": {"scale_attn_weights": (True, lambda v, c: v is True, "True"),
             "scale_attn_by_inverse_layer_idx": _OFF, "add_cross_attention": _OFF},
    "llama": {"attention_bias": _OFF, "mlp_bias": _OFF, "rope_interleaved": _OFF},
    "qwen2": {"use_mrope": _OFF,     # Qwen2-VL's multimodal RoPE
              "layer_types": _LAYER_TYPES, "use_sliding_window": _ONE_WINDOW},
    "qwen3": {"attention_bias": _OFF,   # Qwen3's would bias o_proj too
              "layer_types": _LAYER_TYPES, "use_sliding_window": _ONE_WINDOW},
    "mistral": {},
    "bert": {"position_embedding_type": ("absolute", lambda v, c: v == "absolute", "'absolute'"),
             "is_decoder": _OFF, "add_cross_attention": _OFF, "pruned_heads": (None, lambda v, c: not v, "none")},
}


def check_fields(c: dict) -> None:
    """UserError naming the first field of `c` ptune would not compute as transformers does."""
    model_type = c.get("model_type")
    if model_type not in HF_FAMILIES:
        raise UserError(f"config.json: unknown architecture model_type={model_type!r}; ptune loads "
                        f"{sorted(HF_FAMILIES)}")
    checked = {"is_encoder_decoder": _OFF, **CHECKED[model_type]}
    unknown = sorted(set(c) - METADATA - UNDERSTOOD[model_type] - set(checked))
    if unknown:
        raise UserError(f"config.json: {model_type} field(s) {', '.join(unknown)} unknown to ptune, which refuses "
                        "fields that may change the numerics rather than ignore them (ptune/models/hf_config.py "
                        "lists the fields it understands)")
    for key, (default, accepted, implemented) in checked.items():
        if not accepted(c.get(key, default), c):
            raise UserError(f"config.json: {model_type} {key}={c.get(key, default)!r} changes what the model "
                            f"computes and ptune does not implement it (it implements {key} {implemented})")


# transformers' head_dim where config.json has none (None: hidden_size / num_attention_heads).
_HEAD_DIM = {"qwen3": 128}


def config_from_hf(hf_config: dict, **overrides) -> ModelConfig:
    """A ModelConfig from an HF config.json dict; UserError for a field ptune cannot honour."""
    try:
        check_fields(hf_config)
        family, fields = _fields(hf_config)
    except KeyError as e:
        raise UserError(f"config.json: {hf_config.get('model_type')} config lacks the field {e.args[0]!r}") from None
    return ModelConfig(family=family, **{**fields, **overrides})


def _fields(c: dict) -> tuple[str, dict]:
    """(family, ModelConfig fields) of a checked config.json dict."""
    model_type = c["model_type"]
    family = HF_FAMILIES[model_type]
    if family == "gpt2":
        act_key = "activation_function"
        fields = dict(vocab_size=c["vocab_size"], hidden_size=c["n_embd"], num_layers=c["n_layer"],
                      num_heads=c["n_head"], intermediate_size=c.get("n_inner") or 4 * c["n_embd"],
                      max_positions=c["n_positions"], norm_eps=c.get("layer_norm_epsilon", 1e-5),
                      activation=c.get(act_key, "gelu_new"), tie_embeddings=c.get("tie_word_embeddings", True))
    elif family == "llama":
        act_key, (theta, scaling) = "hidden_act", _rope(c)
        fields = dict(vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], num_layers=c["num_hidden_layers"],
                      num_heads=c["num_attention_heads"], num_kv_heads=c.get("num_key_value_heads"),
                      intermediate_size=c["intermediate_size"], max_positions=c["max_position_embeddings"],
                      norm_eps=c.get("rms_norm_eps", 1e-6), activation=c.get(act_key, "silu"), rope_theta=theta,
                      rope_scaling=scaling, tie_embeddings=c.get("tie_word_embeddings", False),
                      head_dim=c.get("head_dim", _HEAD_DIM.get(model_type)), qkv_bias=model_type == "qwen2",
                      qk_norm=model_type == "qwen3", sliding_window=layer_windows(c)[0])
    else:
        act_key = "hidden_act"
        fields = dict(vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], num_layers=c["num_hidden_layers"],
                      num_heads=c["num_attention_heads"], intermediate_size=c["intermediate_size"],
                      max_positions=c["max_position_embeddings"], norm_eps=c.get("layer_norm_eps", 1e-12),
                      activation=c.get(act_key, "gelu"), type_vocab_size=c.get("type_vocab_size", 2))
    if fields["activation"] not in ACTIVATIONS:
        raise UserError(f"config.json: {act_key}={fields['activation']!r} is not implemented; ptune implements "
                        f"{sorted(ACTIVATIONS)}")
    return family, fields


def _rope(c: dict) -> tuple[float, tuple]:
    """(rope_theta, ModelConfig.rope_scaling) as transformers 5 reads them: `rope_scaling` (older
    configs) before `rope_parameters`; theta, partial_rotary_factor and original_max_position_embeddings
    may sit beside them (the last then wins)."""
    source = "rope_scaling" if c.get("rope_scaling") else "rope_parameters"
    params = dict(c.get(source) or {})
    theta = params.pop("rope_theta", None) or c.get("rope_theta", 10000.0)
    params.setdefault("rope_type", params.pop("type", "default"))
    partial = params.pop("partial_rotary_factor", c.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise UserError(f"config.json: partial_rotary_factor={partial!r} is not implemented; ptune rotates "
                        "every dimension of each head")
    if params["rope_type"] in ("llama3", "yarn"):
        params["original_max_position_embeddings"] = c.get(
            "original_max_position_embeddings", params.get("original_max_position_embeddings",
                                                           c["max_position_embeddings"]))
    try:
        return theta, rope_scaling.normalise(params)
    except UserError as e:
        raise UserError(f"config.json: {source}: {e}") from None


# HF model type (ModelConfig.model_type) -> transformers classes: (language model, sequence classifier, bare body).
HF_CLASSES = {"gpt2": ("GPT2LMHeadModel", "GPT2ForSequenceClassification", "GPT2Model"),
              "llama": ("LlamaForCausalLM", "LlamaForSequenceClassification", "LlamaModel"),
              "qwen2": ("Qwen2ForCausalLM", "Qwen2ForSequenceClassification", "Qwen2Model"),
              "qwen3": ("Qwen3ForCausalLM", "Qwen3ForSequenceClassification", "Qwen3Model"),
              "mistral": ("MistralForCausalLM", "MistralForSequenceClassification", "MistralModel"),
              "bert": ("BertForMaskedLM", "BertForSequenceClassification", "BertModel")}


def _window_fields(model_type: str, window: int | None) -> dict:
    """config.json's window fields: Mistral's sliding_window (4096 where absent), Qwen's on every layer."""
    if model_type == "mistral":
        return dict(sliding_window=window)
    if model_type in ("qwen2", "qwen3") and window is not None:
        return dict(use_sliding_window=True, sliding_window=window, max_window_layers=0)
    return {}


def config_to_hf(cfg: ModelConfig) -> dict:
    """The HF config.json dict of a ModelConfig (the inverse of `config_from_hf`).

    `architectures` names the class whose state dict `hf.to_hf` writes: the sequence
    classifier with a task head, else the LM (decoders) or the bare body (BERT: ptune has
    no masked-LM head).
    """
    model_type = cfg.model_type
    if cfg.qk_norm and cfg.qkv_bias:
        raise UserError("model: qk_norm with qkv_bias has no HF model type (Qwen3's attention_bias would bias "
                        "o_proj too); it cannot be exported as an HF config")
    if cfg.family == "gpt2":
        fields = dict(n_embd=cfg.hidden_size, n_layer=cfg.num_layers, n_head=cfg.num_heads,
                      n_inner=cfg.intermediate_size, n_positions=cfg.max_positions,
                      layer_norm_epsilon=cfg.norm_eps, activation_function=cfg.activation)
    else:
        fields = dict(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                      num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
                      max_position_embeddings=cfg.max_positions, hidden_act=cfg.activation)
    if cfg.family == "llama":
        rope = {"rope_type": "default", **dict(cfg.rope_scaling)}
        fields.update(num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps,
                      rope_theta=cfg.rope_theta, rope_parameters={**rope, "rope_theta": cfg.rope_theta},
                      **({"rope_scaling": rope} if cfg.rope_scaling else {}),   # the field transformers 4 reads
                      **_window_fields(model_type, cfg.sliding_window))
    if cfg.family == "bert":
        fields.update(layer_norm_eps=cfg.norm_eps, type_vocab_size=cfg.type_vocab_size)
    lm, classifier, body = HF_CLASSES[model_type]
    architecture = classifier if cfg.num_labels else lm if cfg.causal else body
    labels = dict(num_labels=cfg.num_labels) if cfg.num_labels else {}
    return dict(model_type=model_type, architectures=[architecture], vocab_size=cfg.vocab_size,
                tie_word_embeddings=cfg.tie_embeddings, **fields, **labels)
