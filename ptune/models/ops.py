"""The numerical building blocks of every layer and site: parameters annotated with logical axes,
products in the compute dtype, and the activations by their HF names.

Site kinds (`ptune.models.sites`) build on these too, so this module imports nothing of the models.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
normal = nn.initializers.normal


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


# HF `hidden_act` names. "gelu" is the exact (erf) GELU; flax's nn.gelu defaults to the tanh form.
ACTIVATIONS = {"relu": nn.relu, "gelu": lambda x: nn.gelu(x, approximate=False),
               "gelu_new": lambda x: nn.gelu(x, approximate=True),
               "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
               "silu": nn.silu, "swish": nn.silu, "tanh": jnp.tanh}
