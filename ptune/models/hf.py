"""ptune parameter trees <-> Hugging Face state dicts, for GPT-2, LLaMA (and Qwen2) and BERT.

The ptune models use HF's module names, so a leaf path maps to an HF key by the rules
in the tables below, never by a per-key list:

    transformer/h_0/attn/c_attn/kernel             transformer.h.0.attn.c_attn.weight    (Conv1D: as is)
    model/layers_3/self_attn/q_proj/kernel         model.layers.3.self_attn.q_proj.weight (nn.Linear: transposed)
    bert/encoder/layer_1/output/LayerNorm/scale    bert.encoder.layer.1.output.LayerNorm.weight
    score/kernel, classifier/bias, lm_head/kernel  score.weight, classifier.bias, lm_head.weight

Site leaves (those a registered site kind owns: LoRA, IA3, adapters, soft prompt, prefix...)
are the methods' parameters: no base checkpoint has them, so `to_hf` leaves them out and
`from_hf` keeps the template's. Their PEFT names are the kinds' (see `ptune.interop.hf_peft`).
"""

from __future__ import annotations

import re

import jax
import numpy as np

from ptune import partition
from ptune.errors import UserError
from ptune.models import WORD_EMBEDDINGS
from ptune.models.sites import is_site

# Where each family's body sits in `*ForCausalLM` / `*ForSequenceClassification` state dicts.
# A bare `GPT2Model` / `LlamaModel` / `BertModel` saves its keys without it; we add it back.
BASE = {"gpt2": "transformer", "llama": "model", "bert": "bert"}
# Heads outside the body: the LM head (untied decoders) and the task heads.
LM_HEAD, TASK_HEADS = "lm_head.weight", ("score.", "classifier.")
# Flax leaf name -> torch parameter name (nn.Dense/Linear, nn.Embed, LayerNorm/RMSNorm).
LEAF_NAMES = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}
# Flax names list entries `h_3`, `layers_3`, `layer_3`; torch ModuleLists `h.3`, ...
LIST_ENTRY = re.compile(r"^(h|layers|layer)_(\d+)$")
# Kernels are (in, out) in Flax and (out, in) in torch's nn.Linear, except in GPT-2's body,
# whose Conv1D layers store (in, out) too. Paths under these prefixes are not transposed.
CONV1D_BODY = {"gpt2": "transformer/"}
# Older checkpoints' names for the same tensors.
OLD_NAMES = [(re.compile(r"LayerNorm\.gamma$"), "LayerNorm.weight"),
             (re.compile(r"LayerNorm\.beta$"), "LayerNorm.bias")]
# HF keys skipped on reading: non-parameter buffers (position ids, RoPE frequencies, GPT-2's
# causal-mask buffers) and BERT's pre-training heads, which ptune does not model.
IGNORED = re.compile(r"position_ids$|rotary_emb\.inv_freq$|\.attn\.(masked_)?bias$|^cls\.")


def hf_module(path: str) -> str:
    """The HF module name of a ptune module path: transformer/h_0/attn -> transformer.h.0.attn."""
    return ".".join(LIST_ENTRY.sub(r"\1.\2", m) for m in path.split("/"))


def hf_key(path: str) -> str:
    """The HF key of a ptune leaf path (any family)."""
    module, _, leaf = path.rpartition("/")
    return f"{hf_module(module)}.{LEAF_NAMES.get(leaf, leaf)}"


def transposed(family: str, path: str) -> bool:
    body = CONV1D_BODY.get(family)
    return path.endswith("/kernel") and not (body and path.startswith(body))


def canonical(family: str, key: str) -> str:
    """An HF key as a `*For...` model names it: current names, body prefix added."""
    for old, new in OLD_NAMES:
        key = old.sub(new, key)
    if not key.startswith((BASE[family] + ".", LM_HEAD) + TASK_HEADS):
        key = f"{BASE[family]}.{key}"
    return key


def _numpy(value) -> np.ndarray:
    return np.asarray(value.numpy() if hasattr(value, "numpy") else value)   # torch tensors too


def to_hf(family: str, params) -> dict[str, np.ndarray]:
    """HF state dict (numpy, torch layouts) of the base parameters; sites are left out."""
    return {hf_key(p): np.asarray(x).T if transposed(family, p) else np.asarray(x)
            for p, x in partition.flatten(params).items() if not is_site(p)}


def short_list(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")


def from_hf(family: str, state: dict, template):
    """`template` (a ptune params tree) with its base leaves taken from the HF `state` dict.

    Site leaves keep their template values, and so do heads a checkpoint may lack: a task
    head (fresh for fine-tuning) and, in a classification checkpoint, the LM head. When the
    template ties the LM head to the embedding, the checkpoint's `lm_head.weight` copy is
    checked and dropped. Any other missing key, unknown key or shape mismatch is an error
    naming the keys.
    """
    state = {canonical(family, k): _numpy(v) for k, v in state.items() if not IGNORED.search(k)}
    flat = partition.flatten(template)
    keys = {p: hf_key(p) for p in flat if not is_site(p)}
    optional = TASK_HEADS + ((LM_HEAD,) if any(k.startswith(TASK_HEADS) for k in state) else ())
    missing = [k for k in keys.values() if k not in state and not k.startswith(optional)]
    unknown = set(state) - set(keys.values())
    embedding = hf_key(WORD_EMBEDDINGS[family])
    if LM_HEAD in unknown and embedding in state:   # a tied template: the LM head must be the embedding
        if not np.array_equal(state[LM_HEAD], state[embedding]):
            raise UserError(f"checkpoint's {LM_HEAD} differs from {embedding}: its LM head is untied; "
                            "set model.tie_embeddings=False")
        unknown.discard(LM_HEAD)
    out, wrong_shape = dict(flat), []
    for path, key in keys.items():
        if key in state:
            value = state[key].T if transposed(family, path) else state[key]
            if value.shape == tuple(flat[path].shape):
                out[path] = np.asarray(value, dtype=flat[path].dtype)   # no copy when dtypes agree
            else:
                wrong_shape.append(f"{key!r} has shape {value.shape} but ptune {path} expects "
                                   f"{tuple(flat[path].shape)}")
    errors = [f"it lacks {short_list(missing)}"] if missing else []
    errors += [f"ptune has no parameter for {short_list(unknown)}"] if unknown else []
    errors += wrong_shape
    if errors:
        raise UserError(f"{family} checkpoint does not fit this model config: " + "; ".join(errors))
    return jax.tree.unflatten(jax.tree.structure(template), list(out.values()))
