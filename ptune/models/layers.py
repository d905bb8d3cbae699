"""Layers shared by every model family, and the sites they know how to grow.

`Linear` grows LoRA and IA3 when its module path matches the site's targets;
`Adapter`, `SoftPrompt` and `PrefixKV` are whole sites; `attend` is attention
with optional prefix keys/values and a KV cache. Parameters carry logical axis
names (``embed``, ``mlp``, ``heads``, ``kv``, ``vocab``) for sharding rules.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ptune.models.sites import Adapter as AdapterSpec
from ptune.models.sites import Prefix as PrefixSpec
from ptune.models.sites import Sites

Dtype = Any
normal = nn.initializers.normal
# PEFT initialises LoRA A like torch.nn.Linear: kaiming_uniform(a=sqrt(5)) = U(±1/sqrt(fan_in)).
lora_a_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def param(module: nn.Module, name: str, init, shape, axes, dtype=jnp.float32):
    """A parameter annotated with logical axis names (one per dimension)."""
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def contract(spec: str, a, b, dtype):
    """jnp.einsum(spec, a, b) in the compute `dtype`. Below float32 the operands are cast to
    `dtype`, multiplied in it and accumulated in float32, in the backward pass too, and the result
    is float32.

    Accelerators accumulate low-precision products in float32 anyway; XLA:CPU runs bf16 products
    on its fast (AMX) path only when asked for a float32 result, and JAX's own transpose of such a
    product mixes a float32 cotangent with a bf16 operand, which falls back to float32: a bf16 step
    is ~2x faster this way on a CPU with AMX (BUILD_NOTES, issue 8). The casts happen inside, so
    the backward pass keeps the operands as given (a float32 weight is live anyway; a bf16 copy
    of every weight would not be) and a float32 weight's gradient is never rounded to bf16."""
    if jnp.dtype(dtype) == jnp.float32:
        return jnp.einsum(spec, a.astype(dtype), b.astype(dtype))
    return _accumulate_f32(spec, jnp.dtype(dtype), a, b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _accumulate_f32(spec, dtype, a, b):
    return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def _accumulate_f32_forward(spec, dtype, a, b):
    return _accumulate_f32(spec, dtype, a, b), (a, b)


def _accumulate_f32_backward(spec, dtype, operands, g):
    """Each operand's gradient is the product of the cotangent (in `dtype`) with the other operand,
    accumulated in float32 and returned in the operand's own dtype (every index of a spec here is
    in two of its three terms, so each gradient is one product)."""
    a, b = operands
    (sa, sb), out = spec.split("->")[0].split(","), spec.split("->")[1]
    g, a_low, b_low = g.astype(dtype), a.astype(dtype), b.astype(dtype)
    da = jnp.einsum(f"{out},{sb}->{sa}", g, b_low, preferred_element_type=jnp.float32)
    db = jnp.einsum(f"{sa},{out}->{sb}", a_low, g, preferred_element_type=jnp.float32)
    return da.astype(a.dtype), db.astype(b.dtype)


_accumulate_f32.defvjp(_accumulate_f32_forward, _accumulate_f32_backward)


def matmul(x, w, dtype):
    """x @ w over x's last axis, in the compute `dtype` (see `contract`), the result in `dtype`."""
    return contract("...i,io->...o", x, w, dtype).astype(dtype)


class Linear(nn.Module):
    """y = x @ kernel + bias, with LoRA and IA3 grown where the sites target this layer."""
    features: int
    axes: tuple[str | None, str | None] = ("embed", "mlp")
    use_bias: bool = True
    sites: Sites = Sites()
    kernel_init: Any = normal(0.02)
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        path = "/".join(self.path)
        lora, ia3 = self.sites.lora, self.sites.ia3
        lora = lora if lora and re.search(lora.targets, path) else None
        ia3 = ia3 if ia3 and re.search(ia3.targets, path) else None
        ia3_on_input = bool(ia3 and re.search(ia3.feedforward, path))
        d_in = x.shape[-1]
        # Base parameters first: Flax derives each parameter's init RNG from the creation
        # order, so sites created later leave the base initialisation unchanged.
        kernel = param(self, "kernel", self.kernel_init, (d_in, self.features), self.axes)
        bias = param(self, "bias", nn.initializers.zeros, (self.features,), (self.axes[1],)) if self.use_bias else None
        x = x.astype(self.dtype)
        if ia3:
            size, axis = (d_in, self.axes[0]) if ia3_on_input else (self.features, self.axes[1])
            scale = param(self, "ia3", nn.initializers.ones, (size,), (axis,)).astype(self.dtype)
        if ia3_on_input:
            x = x * scale
        y = matmul(x, kernel, self.dtype)
        if lora:
            a = param(self, "lora_a", lora_a_init, (d_in, lora.rank), (self.axes[0], None))
            b = param(self, "lora_b", nn.initializers.zeros, (lora.rank, self.features), (None, self.axes[1]))
            h = nn.Dropout(lora.dropout)(x, deterministic=deterministic)
            y = y + matmul(matmul(h, a, self.dtype), b * lora.scale, self.dtype)
        if bias is not None:
            y = y + bias.astype(self.dtype)
        if ia3 and not ia3_on_input:
            y = y * scale
        return y


# HF `hidden_act` names. "gelu" is the exact (erf) GELU; flax's nn.gelu defaults to the tanh form.
ACTIVATIONS = {"relu": nn.relu, "gelu": lambda x: nn.gelu(x, approximate=False),
               "gelu_new": lambda x: nn.gelu(x, approximate=True),
               "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
               "silu": nn.silu, "swish": nn.silu, "tanh": jnp.tanh}


class Adapter(nn.Module):
    """Houlsby/Pfeiffer bottleneck: x + up(act(down(x))), up initialised to 0 (identity)."""
    spec: AdapterSpec
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        d, m, zeros, dt = x.shape[-1], self.spec.size, nn.initializers.zeros, self.dtype
        x = x.astype(dt)
        h = matmul(x, param(self, "down", normal(1e-3), (d, m), ("embed", None)), dt)
        h = ACTIVATIONS[self.spec.activation](h + param(self, "down_bias", zeros, (m,), (None,)).astype(dt))
        h = matmul(h, param(self, "up", zeros, (m, d), (None, "embed")), dt)
        return x + h + param(self, "up_bias", zeros, (d,), ("embed",)).astype(dt)


class SoftPrompt(nn.Module):
    """L trainable input embeddings (Lester et al.), uniform in [-0.5, 0.5] until a method re-initialises them."""
    length: int
    features: int

    @nn.compact
    def __call__(self):
        init = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -0.5, 0.5)
        return param(self, "embedding", init, (self.length, self.features), (None, "embed"))


class PrefixKV(nn.Module):
    """Per-layer key/value prefixes, shape (layers, 2, L, kv_heads, head_dim), float32.

    They do not depend on the batch, so they are computed in float32 whatever the
    compute dtype; `attend` casts them to the keys' dtype.

    With ``spec.hidden`` they come from Li & Liang's reparameterisation
    (embedding -> Linear -> tanh -> Linear), which `ptune.methods.prefix.fold`
    evaluates once to give the direct form (a single ``kv`` parameter).
    """
    spec: PrefixSpec
    num_layers: int
    kv_heads: int
    head_dim: int
    d_model: int

    @nn.compact
    def __call__(self):
        L, width = self.spec.length, self.num_layers * 2 * self.kv_heads * self.head_dim
        shape = (self.num_layers, 2, L, self.kv_heads, self.head_dim)
        if self.spec.hidden is None:
            kv = param(self, "kv", normal(0.02), (self.num_layers, 2, L, self.kv_heads * self.head_dim),
                       ("layers", None, None, "kv"))
            return kv.reshape(shape)
        e = param(self, "embedding", normal(0.02), (L, self.d_model), (None, "embed"))
        h = jnp.tanh(nn.Dense(self.spec.hidden, name="mlp_in")(e))
        kv = nn.Dense(width, name="mlp_out")(h)                       # (L, layers*2*kv)
        return kv.reshape(L, self.num_layers, 2, self.kv_heads, self.head_dim).transpose(1, 2, 0, 3, 4)


def rope(x, positions, theta: float):
    """Rotary embedding in the HF 'rotate_half' convention. x: (B,T,H,D), positions: (B,T)."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    angles = positions[..., None].astype(jnp.float32) * inv_freq            # (B,T,D/2)
    angles = jnp.concatenate([angles, angles], -1)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], -1)
    return (x * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


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


def visible_mask(kv_mask, q_slots, causal: bool, prefix_len: int = 0, shared: int = 0):
    """(B,1,T,prefix_len+S) bool: which keys each query sees. kv_mask: (B,S) segment ids (see
    `segment_positions`); q_slots: (B,T) each query's slot in kv_mask.

    A real query sees the real keys of its own segment, the first `shared` slots (the soft prompt)
    and the prefix, which every example of a packed row shares; a padding query sees every real key.
    With 0/1 masks that is every real key for every query, as before packing.
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
