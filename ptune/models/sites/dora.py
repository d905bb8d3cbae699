"""DoRA (Liu et al., 2024; PEFT's LoRA with `use_dora`): a LoRA whose updated kernel W + s A B is
rescaled column-wise to a learned magnitude m, m = ||W|| at init (the identity):
x @ (m * (W + s A B) / ||W + s A B||). The norm is a constant to the gradient (the paper's §4.3,
as PEFT). Leaves `dora_a`, `dora_b` (as LoRA's) and `dora_m` (out,); everything else is LoRA's:
spec, targets, PiSSA/OLoRA starts, rank padding in the bank, PEFT keys (plus lora_magnitude_vector).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ptune.models.ops import matmul, param
from ptune.models.sites.base import register
from ptune.models.sites.lora import LoRA, LoRAKind


def column_norm(w):
    """||w[:, j]|| for each output j of an (in, out) kernel, in float32."""
    return jnp.linalg.norm(w.astype(jnp.float32), axis=0)


class DoRAKind(LoRAKind):
    name, leaves = "dora", r"/dora_([ab]0?|m)$"
    a, b, m = "dora_a", "dora_b", "dora_m"
    paddable = {"dora_a": 1, "dora_b": 0}
    peft_leaves = {"lora_A.weight": "dora_a", "lora_B.weight": "dora_b", "lora_magnitude_vector": "dora_m"}

    def linear(self, spec: LoRA, call, x, inner):
        layer, w, dt = call.layer, call.kernel, call.layer.dtype
        m = param(layer, self.m, lambda *_: column_norm(w), (w.shape[1],), (layer.axes[1],))
        a, b = self.factors(spec, layer, x.shape[-1])
        g = (m / jax.lax.stop_gradient(column_norm(w + spec.scale * a @ b))).astype(dt)
        h = nn.Dropout(spec.dropout)(x, deterministic=call.deterministic)
        y = inner(x)
        # PEFT rescales the base output of the dropped-out input (the same input without dropout).
        y_h = y if h is x else inner(h)
        return y + (g - 1) * y_h + g * matmul(matmul(h, a, dt), b * spec.scale, dt)

    def merge(self, spec: LoRA, layer: dict, path: str) -> dict:
        """m * (W + s A B) / ||W + s A B||, column-wise; the bias is not rescaled (it is added after)."""
        merged = super().merge(spec, layer, path)
        w = merged["kernel"]
        return {**merged, "kernel": w * layer[self.m] / np.linalg.norm(w, axis=0)}

    def peft_export(self, spec: LoRA, flat: dict, ctx):
        config, tensors = super().peft_export(spec, flat, ctx)
        return dict(config, use_dora=True), tensors


KIND = register(DoRAKind())
