"""Layers shared by every model family.

`Linear` is where site kinds that wrap a linear layer attach (`Sites.wrap_linear`); `attend` is
attention with optional prefix keys/values and a KV cache. Parameters carry logical axis names
(``embed``, ``mlp``, ``heads``, ``kv``, ``vocab``) for sharding rules.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ptune.models.ops import ACTIVATIONS, Dtype, contract, matmul, normal, param
from ptune.models.sites import LinearCall, Sites

__all__ = ["ACTIVATIONS", "Linear", "attend", "contract", "matmul", "param", "rope", "segment_positions",
           "visible_mask"]


class Linear(nn.Module):
    """y = x @ kernel + bias, inside the site kinds that target this layer: those that wrap the product
    x @ kernel (LoRA) add to it before the bias, those that wrap the layer (IA3) see the bias too."""
    features: int
    axes: tuple[str | None, str | None] = ("embed", "mlp")
    use_bias: bool = True
    sites: Sites = Sites()
    kernel_init: Any = normal(0.02)
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        # Base parameters first: Flax derives each parameter's init RNG from the creation
        # order, so sites created later leave the base initialisation unchanged.
        kernel = param(self, "kernel", self.kernel_init, (x.shape[-1], self.features), self.axes)
        bias = param(self, "bias", nn.initializers.zeros, (self.features,), (self.axes[1],)) if self.use_bias else None
        call = LinearCall(self, kernel, deterministic)
        product = self.sites.wrap_linear("product", lambda h: matmul(h, kernel, self.dtype), call)

        def layer(h):
            y = product(h)
            return y if bias is None else y + bias.astype(self.dtype)
        return self.sites.wrap_linear("layer", layer, call)(x.astype(self.dtype))


def rope(x, positions, inv_freq, scale: float = 1.0):
    """Rotary embedding in the HF 'rotate_half' convention. x: (B,T,H,D), positions: (B,T),
    inv_freq: (D/2,) from `rope_scaling.frequencies`, scale: its factor on cos and sin (YaRN)."""
    angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)   # (B,T,D/2)
    angles = jnp.concatenate([angles, angles], -1)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], -1)
    return (x * (jnp.cos(angles) * scale) + rotated * (jnp.sin(angles) * scale)).astype(x.dtype)


def segment_positions(mask):
    """(B,T) position ids counting each segment's tokens from 0. mask: (B,T) segment ids: 0 = padding,
    k >= 1 = the k-th example packed in the row (0/1 for an unpacked row, left or right padded).

    count = cumsum(mask > 0); a segment starts at a real token whose id exceeds every id before it;
    positions = max(count - 1 - (count - 1 at the latest start), 0). A 0/1 mask has one start, where
    count - 1 = 0, so this is exactly max(cumsum(mask) - 1, 0); padding repeats the position before it.
    """
    real = mask > 0
    count = jnp.cumsum(real, axis=1)
    earlier_max = jnp.pad(jax.lax.cummax(mask.astype(jnp.int32), axis=1)[:, :-1], [(0, 0), (1, 0)])
    starts = real & (mask > earlier_max)
    base = jax.lax.cummax(jnp.where(starts, count - 1, 0), axis=1)
    return jnp.maximum(count - 1 - base, 0)


def visible_mask(kv_mask, q_slots, causal: bool, prefix_len: int = 0, shared: int = 0, window: int | None = None):
    """(B,1,T,prefix_len+S) bool: which keys each query sees. kv_mask: (B,S) segment ids (see
    `segment_positions`); q_slots: (B,T) each query's slot in kv_mask.

    A real query sees the real keys of its own segment, the first `shared` slots (the soft prompt)
    and the prefix, which every example of a packed row shares; a padding query sees every real key.
    With 0/1 masks that is every real key for every query, as before packing.
    A `window` (sliding-window attention) hides keys `window` or more slots before the query; the
    prefix counts as the slots just before the first, as in transformers, where it is the KV cache's
    first entries. A KV cache keeps every slot, so this is exact in decode mode too.
    """
    keys = kv_mask[:, None, :]
    q_segment = jnp.take_along_axis(kv_mask, q_slots, axis=1)[:, :, None]
    is_shared = jnp.arange(kv_mask.shape[1]) < shared
    visible = (keys > 0) & ((keys == q_segment) | (q_segment == 0) | is_shared)
    if causal:
        visible = visible & (jnp.arange(kv_mask.shape[1])[None, None, :] <= q_slots[:, :, None])
    if prefix_len:
        pre = jnp.ones(visible.shape[:2] + (prefix_len,), bool)
        visible = jnp.concatenate([pre, visible], -1)
    if window is not None:
        key_slots = jnp.arange(-prefix_len, kv_mask.shape[1])
        visible = visible & (q_slots[:, :, None] - key_slots < window)
    return visible[:, None]


def attend(module: nn.Module, q, k, v, visible, *, prefix=None, cache_index=None, dtype=jnp.float32):
    """Multi-head / grouped-query attention.

    q: (B,T,H,D); k, v: (B,T,K,D) with H % K == 0; visible: (B,1,T,P+S);
    prefix: (2,P,K,D) keys/values seen by every query; cache_index: slot where
    this call's keys go in the module's KV cache (decode mode), else None.
    Returns (B,T,H*D).
    """
    B, T, H, D = q.shape
    if cache_index is not None:
        k, v = _update_cache(module, k, v, cache_index)
    if prefix is not None:
        pk, pv = (jnp.broadcast_to(p, (B,) + p.shape).astype(k.dtype) for p in prefix)
        k, v = jnp.concatenate([pk, k], 1), jnp.concatenate([pv, v], 1)
    K = k.shape[2]
    q = q.reshape(B, T, K, H // K, D)
    scores = contract("btkgd,bskd->bkgts", q, k, dtype).astype(jnp.float32) * D ** -0.5
    scores = jnp.where(visible[:, :, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)   # kept for the backward pass in `dtype`
    out = contract("bkgts,bskd->btkgd", probs, v, dtype).astype(dtype)
    return out.reshape(B, T, H * D)


def _update_cache(module: nn.Module, k, v, index):
    """Write this call's keys/values at `index` and return the whole cache.

    The cache is created (zeros) by initialising the model in decode mode with
    inputs of the full cache length; see `ptune.models.init_cache`.
    """
    initialized = module.has_variable("cache", "key")
    ck = module.variable("cache", "key", jnp.zeros, k.shape, k.dtype)
    cv = module.variable("cache", "value", jnp.zeros, v.shape, v.dtype)
    if not initialized:
        return k, v
    ck.value = jax.lax.dynamic_update_slice(ck.value, k.astype(ck.value.dtype), (0, index, 0, 0))
    cv.value = jax.lax.dynamic_update_slice(cv.value, v.astype(cv.value.dtype), (0, index, 0, 0))
    return ck.value, cv.value
