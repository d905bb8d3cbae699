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
from ptune.models import build, from_checkpoint, rope_scaling
from ptune.models.hf_config import HF_CLASSES, HF_FAMILIES, config_from_hf, config_to_hf
from ptune.models.model_config import ModelConfig
from ptune.models.sites import Sites

# config_from_hf and its kin live in hf_config; callers may keep reaching them here.
__all__ = ["HF_CLASSES", "HF_FAMILIES", "config_from_hf", "config_to_hf", "load", "load_tokenizer", "read",
           "read_gguf", "read_hf_dir"]

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
    arch = reader.fields["general.architecture"].contents() if "general.architecture" in reader.fields else None
    if arch != "llama":
        raise UserError(f"{path}: GGUF architecture {arch!r} is not supported; ptune reads only 'llama' GGUF files")
    meta = {k[len("llama."):]: f.contents() for k, f in reader.fields.items() if k.startswith("llama.")}
    config = _gguf_config(path, meta)
    tensors = {t.name: t for t in reader.tensors}
    unknown = sorted(n for n in tensors if n != "rope_freqs.weight" and _gguf_to_hf(n) is None)
    if unknown:
        raise UserError(f"{path}: GGUF tensor(s) {', '.join(unknown)} are not part of the LLaMA model ptune builds")
    config["tie_word_embeddings"] = "output.weight" not in tensors
    state = {}
    for name, t in tensors.items():
        try:
            weight = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        except NotImplementedError:
            raise UserError(f"{path}: tensor {name} is quantised as {t.tensor_type.name}, which ptune cannot "
                            "dequantize (the gguf package has no dequantizer for it)") from None
        if name == "rope_freqs.weight":
            _set_rope(path, config, _rope_freqs_scaling(path, config, weight))
            continue
        key = _gguf_to_hf(name)
        if key.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config["num_attention_heads" if "q_proj" in key else "num_key_value_heads"]
            weight = _unpermute_rope(weight, heads)
        state[key] = weight
    return config, state


# GGUF `llama.*` metadata -> config.json field. Any other `llama.*` key is refused by name unless
# `_gguf_config` checks or reads it (_GGUF_HANDLED): correct or refused, as config.json (see hf_config).
_GGUF_FIELDS = {"vocab_size": "vocab_size", "embedding_length": "hidden_size", "block_count": "num_hidden_layers",
                "attention.head_count": "num_attention_heads", "attention.head_count_kv": "num_key_value_heads",
                "feed_forward_length": "intermediate_size", "context_length": "max_position_embeddings",
                "attention.layer_norm_rms_epsilon": "rms_norm_eps", "rope.freq_base": "rope_theta"}
_GGUF_HANDLED = ("rope.dimension_count", "attention.key_length", "attention.value_length", "expert_count",
                 "expert_used_count", "rope.scaling.type", "rope.scaling.factor", "rope.scale_linear",
                 "rope.scaling.original_context_length", "rope.scaling.finetuned")   # the last two: yarn's only


def _gguf_config(path, meta: dict) -> dict:
    """The config.json dict of a llama GGUF's metadata (`llama.` prefix dropped)."""
    unknown = sorted(set(meta) - set(_GGUF_FIELDS) - set(_GGUF_HANDLED))
    if unknown:
        raise UserError(f"{path}: GGUF metadata {', '.join('llama.' + k for k in unknown)} unknown to ptune, which "
                        "refuses what may change the numerics rather than ignore it")
    config = {"model_type": "llama", "rope_theta": 10000.0, **{_GGUF_FIELDS[k]: v for k, v in meta.items()
                                                                 if k in _GGUF_FIELDS}}
    # key_length is the head width (Mistral Nemo's 128 against 5120 / 32); values and RoPE must share it.
    config["head_dim"] = head_dim = meta.get("attention.key_length",
                                             config["hidden_size"] // config["num_attention_heads"])
    for key, ok in (("rope.dimension_count", head_dim), ("attention.value_length", head_dim),
                    ("expert_count", 0), ("expert_used_count", 0)):
        if meta.get(key, ok) != ok:
            raise UserError(f"{path}: GGUF llama.{key}={meta[key]} is not implemented (ptune implements {ok})")
    kind = meta.get("rope.scaling.type", "linear" if "rope.scale_linear" in meta else "none")
    if kind not in ("none", "linear"):
        raise UserError(f"{path}: GGUF llama.rope.scaling.type={kind!r} is not implemented (ptune reads "
                        "'none', 'linear' and Llama 3's rope_freqs tensor)")
    if kind == "linear":
        _set_rope(path, config, {"rope_type": "linear",
                                 "factor": meta.get("rope.scaling.factor", meta.get("rope.scale_linear"))})
    return config


def _set_rope(path, config: dict, scaling: dict) -> None:
    if "rope_parameters" in config:
        raise UserError(f"{path}: GGUF has both llama.rope.scaling.type and a rope_freqs tensor; ptune "
                        "implements one RoPE scaling at a time")
    config["rope_parameters"] = {**scaling, "rope_theta": config["rope_theta"]}


def _rope_freqs_scaling(path, config: dict, divisors: np.ndarray) -> dict:
    """Llama 3.x's scaling from the per-frequency divisors llama.cpp stores as `rope_freqs`."""
    scaling = rope_scaling.llama3_from_divisors(divisors, config["head_dim"], config["rope_theta"])
    if scaling is None:
        raise UserError(f"{path}: GGUF tensor rope_freqs holds per-frequency RoPE divisors that are no llama3 "
                        "scaling; ptune implements only llama3's")
    return dict(scaling)


_GGUF_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
               "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
               "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj"}


def _gguf_to_hf(name: str) -> str | None:
    """The HF key of a GGUF tensor name, or None for a tensor ptune has no parameter for."""
    parts = name.split(".")                        # blk.3.attn_q.weight | token_embd.weight
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _GGUF_NAMES:
        return f"model.layers.{parts[1]}.{_GGUF_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _GGUF_NAMES:
        return f"{_GGUF_NAMES[parts[0]]}.{parts[1]}"
    return None


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
