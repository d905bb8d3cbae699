"""What a method is: the sites it adds and the rules that label the tree.

    Method(name, sites, rules)          # rules: ordered (regex, label) pairs or a
                                        # label function (path, leaf) -> label | None
Leaves no rule labels are frozen. `compose(a, b)` is the union of sites and
labels; a leaf two parts label differently is an error.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from ptune import partition
from ptune.errors import UserError
from ptune.models.sites import Sites


@dataclasses.dataclass(frozen=True)
class InitContext:
    """What site initialisers may use once the base weights are in place."""
    rng: Any
    family: str
    encode: Callable[[str], list[int]] | None = None   # text -> token ids
    label_words: Sequence[str] = ()


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    sites: Sites = Sites()
    rules: Sequence[tuple[str, str]] | Callable[[str, Any], str | None] = ()
    optim: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)  # group defaults
    init: Callable[[Any, InitContext], Any] | None = None     # (params, ctx) -> params
    fold: Callable[[Any, Any], tuple[Any, Sites]] | None = None  # (params, model) -> inference form
    trains: bool = True          # False: evaluation only (manual prompts)
    template: str | None = None  # a prompt template that replaces the task's
    parts: tuple[Method, ...] = ()

    def labels(self, params):
        """The label tree of `params` (same structure, a string per leaf)."""
        if self.parts:
            return _union_labels(self.parts, params)
        labels = partition.label(params, self.rules, default=partition.FROZEN)
        if self.trains:
            partition.require_trainable(labels, f"method {self.name!r}")
        return labels

    def initialize(self, params, ctx: InitContext):
        """Site initialisation that needs the loaded base (e.g. prompts from vocabulary)."""
        for part in self.parts or (self,):
            if part.init:
                params = part.init(params, ctx)
        return params

    def folded(self, params, model):
        """(params, sites) in inference form: each site kind's `fold` (e.g. the prefix MLP evaluated into
        keys/values), then each part's own `fold`."""
        sites = model.sites
        for kind, spec in sites.kinds():
            params, folded = kind.fold(spec, params, model.config)
            sites = dataclasses.replace(sites, **{kind.name: folded})
        for part in self.parts or (self,):
            if part.fold:
                params, sites = part.fold(params, model.clone(sites=sites))
        return params, sites


def compose(*methods: Method) -> Method:
    """The hybrid of several methods: union of their sites, rules, defaults and initialisers."""
    parts = tuple(p for m in methods for p in (m.parts or (m,)))
    sites, optim, templates = Sites(), {}, {p.template for p in parts} - {None}
    for p in parts:
        sites = sites.union(p.sites)
        for group, opts in p.optim.items():
            if optim.get(group, opts) != opts:
                raise UserError(f"composed methods give optimizer group {group!r} different defaults")
            optim[group] = opts
    if len(templates) > 1:
        raise UserError(f"composed methods give different templates: {sorted(templates)}")
    return Method("+".join(p.name for p in parts), sites, optim=optim, parts=parts,
                  trains=any(p.trains for p in parts), template=next(iter(templates), None))


def _union_labels(parts: Sequence[Method], params):
    per_part = [p.labels(params) if p.trains else None for p in parts]
    flat = [partition.flatten(lab) if lab is not None else None for lab in per_part]
    merged = {}
    for path in partition.flatten(params):
        owners = {(f[path], p.name) for f, p in zip(flat, parts) if f and f[path] != partition.FROZEN}
        if len({g for g, _ in owners}) > 1:
            detail = ", ".join(f"{g!r} from {n}" for g, n in sorted(owners))
            raise partition.PartitionError(f"composed methods label {path!r} differently: {detail}; "
                                           "drop one of them or change its rules")
        merged[path] = next(iter(owners))[0] if owners else partition.FROZEN
    return jax.tree.unflatten(jax.tree.structure(params), list(merged.values()))


def number(method: str, option: str, value, ok: Callable[[float], bool], wanted: str) -> float:
    """Validate a real option: a finite number for which `ok` holds ("must be {wanted}")."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise UserError(f"method {method}: {option}={value!r} must be a number {wanted}")
    if not (math.isfinite(value) and ok(value)):
        raise UserError(f"method {method}: {option}={value!r} must be {wanted}")
    return float(value)


def module_names(method: str, option: str, value):
    """Validate PEFT-style target modules: None (the family's defaults), a regex string, or a list of
    module names (ptune.models.sites.targets_regex checks the regex)."""
    if value is None or isinstance(value, str) or (isinstance(value, (list, tuple)) and
                                                   all(isinstance(name, str) for name in value)):
        return value
    raise UserError(f"method {method}: {option}={value!r} must be a regex string or a list of module names "
                    "such as ['c_attn']")


def positive_int(method: str, option: str, value, limit: int | None = None, why: str = "") -> int:
    """Validate an integer option; `limit` is an exclusive upper bound."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UserError(f"method {method}: {option}={value!r} must be a positive integer")
    if limit is not None and value >= limit:
        raise UserError(f"method {method}: {option}={value} must be < {limit} {why}".rstrip())
    return value
