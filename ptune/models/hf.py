"""ptune parameter paths <-> Hugging Face checkpoint keys, by rule rather than by list.

    transformer/h_0/attn/c_attn/kernel  <->  transformer.h.0.attn.c_attn.weight
    model/layers_3/self_attn/q_proj/kernel  <->  model.layers.3.self_attn.q_proj.weight  (transposed)

Rules: `h_N`/`layers_N`/`layer_N` <-> `h.N`...; `kernel`, `embedding`, `scale` <-> `weight`;
kernels are transposed for torch `nn.Linear` but not for GPT-2's `Conv1D` layers. Site
leaves (LoRA, IA3, adapters, prompt, prefix) have no HF base key.
"""

from __future__ import annotations

import re

import numpy as np

from ptune import partition

PREFIX = {"gpt2": "transformer", "llama": "model", "bert": "bert"}
HEADS = ("lm_head", "score", "classifier")
SITE = re.compile(r"^(prompt|prefix)/|adapter/|/lora_[ab]$|/ia3$")
# Buffers and heads HF checkpoints may carry that ptune does not model.
IGNORED = re.compile(r"(position_ids$|rotary_emb\.inv_freq$|\.attn\.(masked_)?bias$|^cls\.)")


def is_site(path: str) -> bool:
    return bool(SITE.search(path))


def hf_key(path: str) -> str:
    *modules, leaf = path.split("/")
    modules = [re.sub(r"^(h|layers|layer)_(\d+)$", r"\1.\2", m) for m in modules]
    return ".".join(modules + [{"kernel": "weight", "embedding": "weight", "scale": "weight"}.get(leaf, leaf)])


def _transposed(family: str, path: str) -> bool:
    return path.endswith("/kernel") and not (family == "gpt2" and path.startswith("transformer/"))


def _normalize(family: str, key: str) -> str:
    """Canonical key: add the base prefix bare models omit; old LayerNorm names."""
    key = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key))
    if not key.startswith(PREFIX[family] + ".") and not key.startswith(HEADS):
        key = f"{PREFIX[family]}.{key}"
    return key


def to_hf(family: str, params) -> dict[str, np.ndarray]:
    """HF state dict (numpy, torch layouts) of the base parameters; sites are left out."""
    return {hf_key(p): np.asarray(x).T if _transposed(family, p) else np.asarray(x)
            for p, x in partition.flatten(params).items() if not is_site(p)}


def from_hf(family: str, state: dict, template):
    """`template` (a ptune params tree) with its base leaves replaced by `state`.

    Sites keep their template values, and so does a task head the checkpoint lacks (a
    fresh head), or the LM head when the checkpoint is a classification one. Any other missing key, an unexpected key or a shape
    mismatch is an error naming the key and both shapes.
    """
    state = {_normalize(family, k): v for k, v in state.items() if not IGNORED.search(k)}
    flat = partition.flatten(template)
    # A task head is fresh when absent; so is the LM head of a classification checkpoint.
    fresh = HEADS[1:] + (("lm_head",) if any(k.startswith(HEADS[1:]) for k in state) else ())
    out, used = {}, set()
    for path, leaf in flat.items():
        key = hf_key(path)
        if is_site(path) or (key not in state and key.startswith(fresh)):
            out[path] = leaf
            continue
        if key not in state:
            raise ValueError(f"checkpoint lacks {key!r} (ptune {path}, shape {tuple(leaf.shape)}); "
                             "is it a checkpoint of this architecture and size?")
        value = np.asarray(state[key].numpy() if hasattr(state[key], "numpy") else state[key])
        value = value.T if _transposed(family, path) else value
        if value.shape != tuple(leaf.shape):
            raise ValueError(f"checkpoint key {key!r} has shape {value.shape} but ptune {path} expects "
                             f"{tuple(leaf.shape)}; the config does not match the checkpoint")
        out[path], _ = value.astype(leaf.dtype), used.add(key)
    # A tied model ignores the checkpoint's copy of the embedding as lm_head.
    unexpected = sorted(set(state) - used - {"lm_head.weight"})
    if unexpected:
        raise ValueError(f"checkpoint has {len(unexpected)} key(s) ptune does not know, e.g. {unexpected[:3]}")
    import jax
    return jax.tree.unflatten(jax.tree.structure(template), [out[p] for p in flat])
