"""Pretrained weights in: HF-format directories (config.json + safetensors, any shard count)
and GGUF files (LLaMA family, dequantized). Only safetensors and GGUF are read — never
pickle — and no code from a checkpoint is ever run.

    cfg, params = load("path/to/hf_dir_or_file.gguf", sites)     # params include fresh sites
    tokenizer = load_tokenizer("path/to/hf_dir_or_file.gguf")
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile

import jax
import numpy as np

from ptune.errors import UserError
from ptune.models import build, from_checkpoint
from ptune.models.model_config import ModelConfig
from ptune.models.sites import Sites

# HF `model_type` -> ptune family.
HF_FAMILIES = {"gpt2": "gpt2", "llama": "llama", "qwen2": "llama", "mistral": "llama", "bert": "bert"}


def config_from_hf(hf_config: dict, **overrides) -> ModelConfig:
    """A ModelConfig from an HF config.json dict."""
    model_type = hf_config.get("model_type")
    if model_type not in HF_FAMILIES:
        raise UserError(f"config.json: unknown architecture model_type={model_type!r}; ptune loads "
                        f"{sorted(HF_FAMILIES)}")
    family, c = HF_FAMILIES[model_type], hf_config
    if family == "gpt2":
        fields = dict(vocab_size=c["vocab_size"], hidden_size=c["n_embd"], num_layers=c["n_layer"],
                      num_heads=c["n_head"], intermediate_size=c.get("n_inner") or 4 * c["n_embd"],
                      max_positions=c["n_positions"], norm_eps=c.get("layer_norm_epsilon", 1e-5),
                      activation=c.get("activation_function", "gelu_new"))
    elif family == "llama":
        fields = dict(vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], num_layers=c["num_hidden_layers"],
                      num_heads=c["num_attention_heads"], num_kv_heads=c.get("num_key_value_heads"),
                      intermediate_size=c["intermediate_size"], max_positions=c["max_position_embeddings"],
                      norm_eps=c.get("rms_norm_eps", 1e-6), activation=c.get("hidden_act", "silu"),
                      rope_theta=c.get("rope_theta", (c.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
                      tie_embeddings=c.get("tie_word_embeddings", False),
                      qkv_bias=c.get("attention_bias", model_type == "qwen2"))
    else:
        fields = dict(vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], num_layers=c["num_hidden_layers"],
                      num_heads=c["num_attention_heads"], intermediate_size=c["intermediate_size"],
                      max_positions=c["max_position_embeddings"], norm_eps=c.get("layer_norm_eps", 1e-12),
                      activation=c.get("hidden_act", "gelu"), type_vocab_size=c.get("type_vocab_size", 2))
    return ModelConfig(family=family, **{**fields, **overrides})


# ptune family -> transformers classes: (language model, sequence classifier, bare body).
HF_CLASSES = {"gpt2": ("GPT2LMHeadModel", "GPT2ForSequenceClassification", "GPT2Model"),
              "llama": ("LlamaForCausalLM", "LlamaForSequenceClassification", "LlamaModel"),
              "qwen2": ("Qwen2ForCausalLM", "Qwen2ForSequenceClassification", "Qwen2Model"),
              "bert": ("BertForMaskedLM", "BertForSequenceClassification", "BertModel")}


def config_to_hf(cfg: ModelConfig) -> dict:
    """The HF config.json dict of a ModelConfig (the inverse of `config_from_hf`).

    `architectures` names the class whose state dict `hf.to_hf` writes: the sequence
    classifier with a task head, else the LM (decoders) or the bare body (BERT: ptune has
    no masked-LM head).
    """
    model_type = "qwen2" if cfg.qkv_bias else cfg.family   # LLaMA's attention_bias would add o_proj's too
    if cfg.family == "gpt2":
        fields = dict(n_embd=cfg.hidden_size, n_layer=cfg.num_layers, n_head=cfg.num_heads,
                      n_inner=cfg.intermediate_size, n_positions=cfg.max_positions,
                      layer_norm_epsilon=cfg.norm_eps, activation_function=cfg.activation)
    else:
        fields = dict(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                      num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
                      max_position_embeddings=cfg.max_positions, hidden_act=cfg.activation)
    if cfg.family == "llama":
        fields.update(num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps,
                      rope_theta=cfg.rope_theta, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})
    if cfg.family == "bert":
        fields.update(layer_norm_eps=cfg.norm_eps, type_vocab_size=cfg.type_vocab_size)
    lm, classifier, body = HF_CLASSES[model_type]
    architecture = classifier if cfg.num_labels else lm if cfg.causal else body
    labels = dict(num_labels=cfg.num_labels) if cfg.num_labels else {}
    return dict(model_type=model_type, architectures=[architecture], vocab_size=cfg.vocab_size,
                tie_word_embeddings=cfg.tie_embeddings, **fields, **labels)


def read_hf_dir(path: pathlib.Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(config.json dict, state dict) from an HF directory with one or more safetensors files."""
    from safetensors.numpy import load_file
    config_file = path / "config.json"
    if not config_file.exists():
        raise UserError(f"{path} has no config.json; an HF model directory needs config.json + *.safetensors")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UserError(f"{path} has no *.safetensors weights (ptune never loads pickle/.bin files)")
    state = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except Exception as e:   # safetensors raises its own error types for truncated/corrupt files
            raise UserError(f"{f}: not a readable safetensors file ({e}); re-download or re-export it") from None
    return json.loads(config_file.read_text()), state


def read_gguf(path: pathlib.Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(HF-style config dict, HF-named f32 state dict) from a LLaMA-family GGUF file."""
    import gguf
    reader = gguf.GGUFReader(str(path))
    field = lambda key, default=None: reader.fields[key].contents() if key in reader.fields else default
    arch = field("general.architecture")
    if arch != "llama":
        raise UserError(f"{path}: GGUF architecture {arch!r}; ptune reads only 'llama' GGUF files")
    heads, kv_heads = field("llama.attention.head_count"), field("llama.attention.head_count_kv")
    config = {"model_type": "llama", "vocab_size": field("llama.vocab_size"),
              "hidden_size": field("llama.embedding_length"), "num_hidden_layers": field("llama.block_count"),
              "num_attention_heads": heads, "num_key_value_heads": kv_heads,
              "intermediate_size": field("llama.feed_forward_length"),
              "max_position_embeddings": field("llama.context_length"),
              "rms_norm_eps": field("llama.attention.layer_norm_rms_epsilon"),
              "rope_theta": field("llama.rope.freq_base", 10000.0)}
    names = {t.name for t in reader.tensors}
    config["tie_word_embeddings"] = "output.weight" not in names
    state = {}
    for t in reader.tensors:
        weight = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        key = _gguf_to_hf(t.name)
        if key.endswith(("q_proj.weight", "k_proj.weight")):
            weight = _unpermute_rope(weight, heads if "q_proj" in key else kv_heads)
        state[key] = weight
    return config, state


_GGUF_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
               "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
               "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj"}


def _gguf_to_hf(name: str) -> str:
    parts = name.split(".")                        # blk.3.attn_q.weight | token_embd.weight
    if parts[0] == "blk":
        return f"model.layers.{parts[1]}.{_GGUF_NAMES[parts[2]]}.{parts[3]}"
    return f"{_GGUF_NAMES[parts[0]]}.{parts[1]}"


def _unpermute_rope(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp stores Q/K rows interleaved per head; HF uses the rotate-half layout."""
    out, d_in = w.shape
    return w.reshape(heads, out // heads // 2, 2, d_in).swapaxes(1, 2).reshape(out, d_in)


def read(source) -> tuple[dict, dict[str, np.ndarray]]:
    path = pathlib.Path(source)
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist")
    if path.suffix == ".gguf":
        return read_gguf(path)
    if path.is_dir():
        return read_hf_dir(path)
    raise UserError(f"checkpoint {path}: expected an HF directory (config.json + safetensors) or a .gguf file")


def load(source, sites: Sites = Sites(), **overrides) -> tuple[ModelConfig, dict]:
    """(config, params): pretrained base weights plus freshly initialised sites."""
    hf_config, state = read(source)
    cfg = config_from_hf(hf_config, **overrides)
    return cfg, from_checkpoint(build(cfg, sites), state, jax.random.key(0))


def load_tokenizer(source):
    """The checkpoint's tokenizer through transformers, from local files only.

    A GGUF tokenizer is built from the file's metadata without torch (`gguf_tokenizer`) once
    and cached in `<file>.tokenizer/` (building takes ~3 s).
    """
    from transformers import AutoTokenizer

    from ptune.data.tokenizers import HFTokenizer
    from ptune.models.gguf_tokenizer import from_gguf
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = pathlib.Path(source)
    if path.suffix == ".gguf":
        cached = path.with_name(path.name + ".tokenizer")
        if not (cached / "tokenizer.json").exists():
            tokenizer = from_gguf(path)
            tmp = pathlib.Path(tempfile.mkdtemp(dir=path.parent))
            tokenizer.save_pretrained(str(tmp))
            os.replace(tmp, cached)          # atomic: a half-converted tokenizer never looks complete
        path = cached
    return HFTokenizer(AutoTokenizer.from_pretrained(str(path)))
