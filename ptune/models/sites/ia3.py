"""IA3 (Liu et al., 2022): a learned scale, initialised to 1, on the output of each target layer,
or on its input for the feed-forward layers among them (PEFT semantics). Leaf `ia3`: (out,) or (in,)."""

from __future__ import annotations

import dataclasses
import re

import flax.linen as nn
import numpy as np

from ptune.errors import UserError
from ptune.models.ops import param
from ptune.models.sites.base import SiteKind, register, union_regex


@dataclasses.dataclass(frozen=True)
class IA3:
    targets: str       # layers whose output is scaled
    feedforward: str   # among those, layers whose *input* is scaled instead (PEFT semantics)

    def on_input(self, module: str) -> bool:
        return bool(re.search(self.feedforward, module))


class IA3Kind(SiteKind):
    name, spec, leaves, wraps, sharding = "ia3", IA3, r"/ia3$", "layer", "replicated"
    defaults = {"gpt2": {"targets": ["c_attn", "mlp.c_proj"], "feedforward": ["mlp.c_proj"]},
                "llama": {"targets": ["k_proj", "v_proj", "down_proj"], "feedforward": ["down_proj"]},
                # PEFT scales the queries, not the keys, of Qwen models
                **dict.fromkeys(("qwen2", "qwen3"), {"targets": ["q_proj", "v_proj", "down_proj"],
                                                     "feedforward": ["down_proj"]}),
                "bert": {"targets": ["key", "value", "output.dense"], "feedforward": ["output.dense"]}}
    peft_type, peft_options = "IA3", frozenset({"feedforward_modules", "init_ia3_weights"})

    def linear(self, spec: IA3, call, x, inner):
        layer = call.layer
        on_input = spec.on_input("/".join(layer.path))
        size, axis = (x.shape[-1], layer.axes[0]) if on_input else (layer.features, layer.axes[1])
        scale = param(layer, "ia3", nn.initializers.ones, (size,), (axis,)).astype(layer.dtype)
        return inner(x * scale) if on_input else inner(x) * scale

    def merge(self, spec: IA3, layer: dict, path: str) -> dict:
        """Input scaling scales the rows of W (the bias is untouched); output scaling its columns and the bias."""
        scale, out = layer["ia3"], {k: v for k, v in layer.items() if k != "ia3"}
        if spec.on_input(path):
            out["kernel"] = out["kernel"] * scale[:, None]
            return out
        out["kernel"] = out["kernel"] * scale[None, :]
        if "bias" in out:
            out["bias"] = out["bias"] * scale
        return out

    def bank_spec(self, specs):
        """Union of targets (a layer a task does not scale keeps the identity, 1)."""
        present = [s for s in specs.values() if s is not None]
        return IA3(union_regex([s.targets for s in present]), union_regex([s.feedforward for s in present]))

    def bank_leaf(self, spec: IA3, bank_spec: IA3, path: str, value):
        """A layer one task scales on its output and the bank on its input would read wrong scales."""
        layer = path.removesuffix("/ia3")
        if spec.on_input(layer) != bank_spec.on_input(layer):
            side = "input" if spec.on_input(layer) else "output"
            raise UserError(f"IA3 on {layer} scales the layer's {side}, another task in the bank the other side; "
                            "they cannot share a bank")
        return value

    def peft_export(self, spec: IA3, flat: dict, ctx):
        tensors = {ctx.peft_key(p, {"ia3_l": "ia3"}): np.asarray(x).reshape(
            (1, -1) if spec.on_input(p.rpartition("/")[0]) else (-1, 1)) for p, x in flat.items() if self.owns(p)}
        targeted = [m for m in ctx.layers if f"{m}/ia3" in flat]
        on_input = [m for m in targeted if spec.on_input(m)]
        return dict(ctx.tuner_config(targeted), feedforward_modules=ctx.target_modules(on_input)), tensors

    def peft_load(self, config: dict, tensors: dict, ctx):
        """PEFT's (1, n) scales are on inputs, (n, 1) on outputs."""
        origin, on_input = {}, []
        for path, (key, x) in ctx.layer_leaves(self.name, tensors, {"ia3_l": "ia3"}).items():
            if x.ndim != 2 or 1 not in x.shape:
                raise UserError(f"{ctx.weights}: {key!r} has shape {x.shape}; PEFT IA3 scales are (n, 1) or (1, n)")
            on_input += [path.removesuffix("/ia3")] if x.shape[0] == 1 else []
            origin[path] = key, x.reshape(-1)
        targeted = sorted({p.removesuffix("/ia3") for p in origin})
        return "ia3", dict(targets=ctx.names(targeted), feedforward=ctx.names(on_input)), origin


KIND = register(IA3Kind())
