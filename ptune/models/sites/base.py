"""Site kinds and the sites a model grows.

A *site kind* (LoRA, IA3, adapter, prefix, prompt, or one written outside the package) is one
`SiteKind` subclass, registered by name, that owns everything about it:

* its spec (options, a frozen dataclass) and which parameter leaves are its own (`leaves`);
* how it attaches to the model, through the hooks the layers call: a linear layer
  (`linear`, wrapping the product x @ kernel or the whole layer), a block's sublayer output
  before the residual (`sublayer_output`), the input embeddings (`input_embeddings`) and
  every layer's attention keys/values (`layer_kv`). It starts as the identity (or as extra
  context, for prompts and prefixes);
* its inference form (`fold`) and its merge into the base weights (`merge`);
* its HF PEFT format (`peft_type`, `peft_export`, `peft_load`; see `ptune.interop.hf_peft`);
* how the adapter bank stacks it (`bank_spec`, `bank_leaf`, `paddable`);
* how it is sharded (`sharding`).

The model hooks do nothing unless a kind overrides them. The others have no default: a kind
that does not say how it exports, merges, banks or shards raises `MissingHook`, naming itself
and what to implement, where that is attempted (never a silent guess).

`Sites` is the open collection {kind name: spec} a method asks for; `sites.lora` is the LoRA
spec or None, for every registered kind.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax.numpy as jnp

from ptune.errors import UserError

SHARDINGS = ("replicated", "logical")
LINEAR_STAGES = ("product", "layer")


class MissingHook(UserError):
    """A site kind was asked for something it does not implement (export, merge, bank, sharding)."""


class LinearCall(NamedTuple):
    """What a kind wrapping a linear layer sees: the `layer` (an `nn.Module`: create parameters on it,
    read its `axes`, `features` and compute `dtype`), its `kernel` (in, out) and whether dropout is off."""
    layer: Any
    kernel: Any
    deterministic: bool


def targets_regex(targets: str | Sequence[str]) -> str:
    """A regex from PEFT-style `target_modules`: a regex string, or names matched as suffixes."""
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as e:
            raise UserError(f"targets {targets!r} is not a valid regex ({e}); fix it, or give a list of module "
                            "names such as ['c_attn']") from None
        return targets
    return r"(^|/)(" + "|".join(re.escape(t).replace(r"\.", "/") for t in targets) + r")$"


def union_regex(patterns: Sequence[str]) -> str:
    """One regex matching what any of `patterns` matches."""
    unique = sorted(set(patterns))
    return unique[0] if len(unique) == 1 else "|".join(f"(?:{p})" for p in unique)


def one_length(name: str, specs: Mapping[str, Any]):
    """The spec every task of a bank shares for a kind that adds context positions (prompt, prefix):
    padding its length would need a per-example position mask the models lack."""
    lengths = {task: (s.length if s else 0) for task, s in specs.items()}
    if len(set(lengths.values())) > 1:
        raise UserError(f"tasks need {name} lengths {lengths} (0: none); a bank holds one {name} length for all "
                        "its tasks, since padding would need a per-example position mask the models lack: bank "
                        "these tasks separately")
    return next(s for s in specs.values() if s is not None)


class SiteKind:
    """One kind of site. Set the class attributes, override the hooks of the points it attaches to
    and what it supports, and `register()` an instance."""
    name: str = ""              # its key in Sites, e.g. "lora"
    spec: type = object         # its options: a frozen (hashable) dataclass
    leaves: str = ""            # regex over '/'-joined parameter paths: the leaves this kind adds
    # Linear layers: "product" wraps x @ kernel (before the bias: LoRA), "layer" the whole layer (IA3).
    wraps: str | None = None
    # "replicated" (unless config.mesh.shard_sites matches the leaf) or "logical" (by the logical axes
    # its parameters carry, like the base); None: the kind has not said, and sharding it is an error.
    sharding: str | None = None
    # PEFT's default options per model family, e.g. {"gpt2": {"targets": ["c_attn"]}}, and per HF model
    # type (ModelConfig.model_type) where PEFT's differ from the family's (see `defaults_for`).
    defaults: Mapping[str, Mapping[str, Any]] = {}
    # The bank: leaf name -> the one axis along which a task's leaf may be smaller (zero-padded, exact).
    paddable: Mapping[str, int] = {}
    # HF PEFT: its peft_type, and the adapter_config.json keys its loader reads or that change nothing.
    peft_type: str | None = None
    peft_options: frozenset = frozenset()

    def defaults_for(self, family: str, model_type: str | None = None) -> Mapping[str, Any]:
        """PEFT's default options for a model: its HF model type's where PEFT names them apart, else its family's."""
        return self.defaults.get(model_type) or self.defaults.get(family, {})

    def owns(self, path: str) -> bool:
        return bool(re.search(self.leaves, path))

    def implements(self, hook: str) -> bool:
        return getattr(type(self), hook) is not getattr(SiteKind, hook)

    def missing(self, what: str, hook: str) -> MissingHook:
        return MissingHook(f"site kind {self.name!r} does not say {what}: define {type(self).__name__}.{hook} "
                           "(see ptune.models.sites.base.SiteKind)")

    # ---- the model (defaults: not attached there) -------------------------------------------------

    def targets(self, spec, path: str) -> bool:
        """Whether it wraps the linear layer at module path `path` (a kind with `wraps`); by default
        its spec's `targets` regex searched in the path, as PEFT's target_modules."""
        return bool(re.search(spec.targets, path))

    def linear(self, spec, call: LinearCall, x, inner: Callable):
        """The wrapped layer's output for input x (compute dtype); `inner(x)` is what it wraps."""
        return inner(x)

    def sublayer_output(self, spec, h, where: str, *, dtype, name: str):
        """A block's attention or MLP output (`where`: "attention" or "mlp"), before the residual.
        Create any module as `name`."""
        return h

    def input_tokens(self, spec) -> int:
        """How many embeddings it prepends to the input."""
        return 0

    def input_embeddings(self, spec, config, *, name: str):
        """(input_tokens, hidden_size) embeddings, as a module named `name`."""
        raise self.missing("its input embeddings", "input_embeddings")

    def kv_tokens(self, spec) -> int:
        """How many key/value positions it prepends in every layer's attention."""
        return 0

    def layer_kv(self, spec, config, *, name: str):
        """(layers, 2, kv_tokens, kv_heads, head_dim) keys/values, as a module named `name`."""
        raise self.missing("its attention keys/values", "layer_kv")

    # ---- inference form ---------------------------------------------------------------------------

    def fold(self, spec, params: dict, config) -> tuple[dict, Any]:
        """(params, spec) in inference form (e.g. a reparameterisation evaluated); default: as is."""
        return params, spec

    def merge(self, spec, layer: dict, path: str) -> dict:
        """One linear layer's leaves {name: float32 array} (kernel (in, out), bias, its own) at module
        path `path` -> the layer's leaves with this kind folded into kernel/bias and its own removed."""
        raise self.missing("how it merges into base weights", "merge")

    # ---- the adapter bank (ptune.inference.bank) -------------------------------------------------------------

    def bank_spec(self, specs: Mapping[str, Any]) -> Any:
        """The spec the bank's model grows to hold every task's {task: spec or None (the task lacks it)};
        a UserError naming the tasks when they cannot share a bank."""
        raise self.missing("how the adapter bank stacks it", "bank_spec")

    def bank_leaf(self, spec, bank_spec, path: str, value):
        """A task's leaf as the bank stores it (before padding to the bank's shape: elementwise changes
        only); a UserError when the bank's spec would read it wrongly. Default: as is."""
        return value

    # ---- HF PEFT (ptune.interop.hf_peft) ------------------------------------------------------------------

    def peft_export(self, spec, flat: dict, ctx) -> tuple[dict, dict]:
        """(adapter_config.json entries, {PEFT key: array}) of the folded params `flat`."""
        raise self.missing("its HF PEFT format", "peft_export (and peft_type, peft_load)")

    def peft_load(self, config: dict, tensors: dict, ctx) -> tuple[str, dict, dict]:
        """(method name, its options, {ptune path: (file key, array in ptune layout)}) from a PEFT adapter."""
        raise self.missing("how it loads from HF PEFT", "peft_load")


KINDS: dict[str, SiteKind] = {}


def register(kind: SiteKind) -> SiteKind:
    """Add (or replace) a site kind, so that `Sites(**{kind.name: spec})` and every part of ptune use it."""
    if not (isinstance(kind, SiteKind) and kind.name.isidentifier()):
        raise UserError(f"register({kind!r}): give a SiteKind instance whose name is an identifier")
    if not (isinstance(kind.leaves, str) and kind.leaves):
        raise UserError(f"site kind {kind.name!r}: set `leaves`, a regex matching the parameter paths it adds "
                        "(e.g. r'/dora_m$'); without it they would pass for base weights")
    if kind.sharding not in (None, *SHARDINGS):
        raise UserError(f"site kind {kind.name!r}: sharding={kind.sharding!r}; choose one of {SHARDINGS} or None")
    if kind.implements("linear") != (kind.wraps in LINEAR_STAGES):
        raise UserError(f"site kind {kind.name!r}: a kind that overrides `linear` sets wraps to one of "
                        f"{LINEAR_STAGES} (and only such a kind); wraps={kind.wraps!r}")
    KINDS[kind.name] = kind
    return kind


def kind_of(path: str) -> SiteKind | None:
    """The registered kind whose leaf `path` is, or None for a base weight."""
    return next((k for k in KINDS.values() if k.owns(path)), None)


def is_site(path: str) -> bool:
    return kind_of(path) is not None


@dataclasses.dataclass(frozen=True, init=False)
class Sites:
    """What a method asks the model to grow: at most one spec per registered kind.

        Sites(lora=LoRA(8, 16.0, "c_attn$"), prompt=Prompt(20))
        sites.lora            # the LoRA spec, or None when absent
        dataclasses.replace(sites, prompt=None)   # without the prompt
    """
    specs: tuple   # ((kind name, spec), ...) in registration order

    def __init__(self, specs: tuple = (), **by_kind):
        merged = {**dict(specs), **by_kind}
        unknown = sorted(set(merged) - set(KINDS))
        if unknown:
            raise UserError(f"unknown site kind(s) {unknown}; registered kinds are {sorted(KINDS)} "
                            "(register a new one with ptune.models.sites.register)")
        object.__setattr__(self, "specs", tuple((n, merged[n]) for n in KINDS if merged.get(n) is not None))

    def __getattr__(self, name: str):
        if name in KINDS:
            return dict(self.__dict__.get("specs", ())).get(name)
        raise AttributeError(f"Sites has no attribute {name!r} (and no site kind of that name)")

    def kinds(self) -> list[tuple[SiteKind, Any]]:
        """[(kind, spec)] of the kinds present, in registration order."""
        return [(KINDS[n], spec) for n, spec in self.specs]

    def names(self) -> list[str]:
        return [n for n, _ in self.specs]

    def without(self, *names: str) -> Sites:
        return Sites(self.specs, **dict.fromkeys(names))

    def union(self, other: Sites) -> Sites:
        """Both methods' sites; the same kind asked for twice must agree."""
        mine, theirs = dict(self.specs), dict(other.specs)
        for name in mine.keys() & theirs.keys():
            if mine[name] != theirs[name]:
                raise UserError(f"composed methods ask for different {name} sites: {mine[name]} vs "
                                f"{theirs[name]}; give them one {name} spec")
        return Sites(**theirs, **{n: s for n, s in mine.items() if n not in theirs})

    # ---- what the models call ---------------------------------------------------------------------

    def wrap_linear(self, stage: str, inner: Callable, call: LinearCall) -> Callable:
        """`inner` (x -> y at `stage`, see SiteKind.wraps) inside every kind that wraps this layer there;
        kinds registered later sit outside (and create their parameters first)."""
        path = "/".join(call.layer.path)
        for kind, spec in self.kinds():
            if kind.wraps == stage and kind.targets(spec, path):
                inner = _wrapped(kind, spec, call, inner)
        return inner

    def sublayer_output(self, h, where: str, *, dtype, name: str = "{kind}"):
        """h through every kind attached after a block's `where` sublayer; modules named `name` with
        {kind} filled in."""
        for kind, spec in self.kinds():
            h = kind.sublayer_output(spec, h, where, dtype=dtype, name=name.format(kind=kind.name))
        return h

    @property
    def input_tokens(self) -> int:
        return sum(kind.input_tokens(spec) for kind, spec in self.kinds())

    @property
    def kv_tokens(self) -> int:
        return sum(kind.kv_tokens(spec) for kind, spec in self.kinds())

    @property
    def extra_positions(self) -> int:
        """Context taken by prompt and prefix tokens."""
        return self.input_tokens + self.kv_tokens

    def input_embeddings(self, config):
        """(input_tokens, d) prepended embeddings, or None."""
        parts = [k.input_embeddings(s, config, name=k.name) for k, s in self.kinds() if k.input_tokens(s)]
        return jnp.concatenate(parts, 0) if len(parts) > 1 else (parts or [None])[0]

    def layer_kv(self, config):
        """(layers, 2, kv_tokens, kv_heads, head_dim) keys/values every query sees, or None."""
        parts = [k.layer_kv(s, config, name=k.name) for k, s in self.kinds() if k.kv_tokens(s)]
        return jnp.concatenate(parts, 2) if len(parts) > 1 else (parts or [None])[0]


def _wrapped(kind: SiteKind, spec, call: LinearCall, inner: Callable) -> Callable:
    return lambda x: kind.linear(spec, call, x, inner)
