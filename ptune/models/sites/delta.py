"""What LoHa, LoKr and VeRA share: a kind whose change to a linear layer is a kernel delta dW (in, out)
built from a few tensors per targeted layer: y = x W + x dW, merged as W + dW.

Each kind says which leaves it `create`s on a layer and how they make `delta`; this class attaches
them, merges them, and reads and writes them in PEFT's per-module format. PEFT keeps 2-D tensors
in torch's (out, in) layout and ptune's kernels are (in, out), so ptune stores their transposes
(as LoRA does) and a PEFT product a @ b reads b @ a here.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from ptune.errors import UserError
from ptune.models.ops import matmul
from ptune.models.sites.base import SiteKind, union_regex


class DeltaKind(SiteKind, abc.ABC):
    """A kind subclass must define the four abstract hooks (instantiating it fails otherwise)."""
    wraps, sharding = "product", "replicated"
    peft_names: Sequence[str] = ()        # the leaves PEFT saves per module, named as PEFT names them
    scaled_leaves: Sequence[str] = ()     # the factor the bank multiplies by a task's scale (alpha / r)
    on_conv1d = False                     # whether PEFT wraps GPT-2's Conv1D layers (it does for VeRA only)

    @abc.abstractmethod
    def create(self, spec, layer, features_in: int) -> dict:
        """{leaf name: array} of one layer, created on `layer` (an nn.Module: axes, features)."""

    @abc.abstractmethod
    def delta(self, spec, leaves: Mapping):
        """dW (in, out) of one layer from its leaves (jax or numpy arrays)."""

    @abc.abstractmethod
    def peft_config(self, spec) -> dict:
        """adapter_config.json entries of `spec` besides the targets."""

    @abc.abstractmethod
    def options(self, config: dict) -> dict:
        """The method's options, besides targets, from a PEFT adapter_config.json."""

    def linear(self, spec, call, x, inner):
        return inner(x) + matmul(x, self.delta(spec, self.create(spec, call.layer, x.shape[-1])), call.layer.dtype)

    def merge(self, spec, layer: dict, path: str) -> dict:
        own = {k: v for k, v in layer.items() if self.owns(f"{path}/{k}")}
        out = {k: v for k, v in layer.items() if k not in own}
        out["kernel"] = layer["kernel"] + np.asarray(self.delta(spec, own), np.float32)
        return out

    def bank_leaf(self, spec, bank_spec, path: str, value):
        """The bank's spec has scale 1: the task's scale goes into one factor of its (bilinear) delta."""
        scaled = path.rpartition("/")[2] in self.scaled_leaves
        return value * np.asarray(spec.scale, value.dtype) if scaled else value

    def peft_export(self, spec, flat: dict, ctx):
        if ctx.config.family == "gpt2" and not self.on_conv1d:
            raise UserError(f"PEFT's {self.peft_type} wraps torch nn.Linear layers only, and GPT-2's are transformers "
                            f"Conv1D layers: export {self.name} adapters of llama or bert models, or train LoRA or "
                            "VeRA on GPT-2")
        names = {n: n for n in self.peft_names}
        tensors = {ctx.peft_key(p, names): np.asarray(x).T for p, x in flat.items()
                   if self.owns(p) and p.rpartition("/")[2] in names}
        targeted = [m for m in ctx.layers if any(f"{m}/{n}" in flat for n in names)]
        tuner = ctx.tuner_config(targeted) if self.on_conv1d else dict(target_modules=ctx.target_modules(targeted))
        return dict(self.peft_config(spec), **tuner), tensors

    def peft_load(self, config: dict, tensors: dict, ctx):
        leaves = ctx.layer_leaves(self.name, tensors, {n: n for n in self.peft_names})
        origin = {p: (key, x.T) for p, (key, x) in leaves.items()}
        targeted = sorted({p.rpartition("/")[0] for p in origin})
        return self.name, dict(self.options(config), targets=ctx.names(targeted)), origin


def shared_bank_spec(name: str, specs: Mapping, same: Sequence[str], **fixed):
    """The bank's spec of a kind whose tasks must agree on the fields `same`: the union of their targets,
    with `fixed` fields set (a layer a task does not adapt keeps its identity init)."""
    present = {task: s for task, s in specs.items() if s is not None}
    for field in same:
        values = {task: getattr(s, field) for task, s in present.items()}
        if len(set(values.values())) > 1:
            raise UserError(f"tasks' {name} sites have different {field} {values}; a bank holds one {field} for "
                            f"all its {name} tasks: bank these tasks separately")
    first = next(iter(present.values()))
    return dataclasses.replace(first, targets=union_regex([s.targets for s in present.values()]), **fixed)
