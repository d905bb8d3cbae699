"""The core of ptune: every adaptation method is a labelling of one parameter tree.

A *label tree* has exactly the structure of the parameter tree, with a string at
every leaf: ``FROZEN`` or the name of a trainable group (``"lora"``, ``"prompt"``,
``"head"``...). Everything else is derived from it: which subtree is
differentiated (``split``/``merge``), which optimizer each group gets
(``ptune.optim``), what a checkpoint holds, what ``summary`` reports.

Leaves are named by their '/'-joined path, e.g. ``transformer/h_0/attn/c_attn/kernel``.
Nothing here knows about models or methods.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ptune.errors import UserError

FROZEN = "frozen"

Rules = Sequence[tuple[str, str]] | Callable[[str, Any], str]


class PartitionError(UserError):
    """A labelling that is not a valid partition of the parameter tree."""


def path_str(keypath) -> str:
    """'/'-joined name of a `jax.tree_util` key path."""
    parts = []
    for key in keypath:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def flatten(tree) -> dict[str, Any]:
    """{path: leaf} for every leaf of `tree`, in tree order."""
    return {path_str(kp): leaf for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten(flat: Mapping[str, Any]) -> dict:
    """Nested dicts from {path: leaf} (the inverse of `flatten` for dict trees)."""
    out: dict = {}
    for path, leaf in flat.items():
        *parents, name = path.split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[name] = leaf
    return out


def nearest_paths(pattern: str, paths: Sequence[str], n: int = 5) -> list[str]:
    """The paths that look most like `pattern`, to suggest a fix for a rule."""
    close = difflib.get_close_matches(pattern, paths, n=n, cutoff=0.0)
    return close or list(paths)[:n]


def compile_rules(rules: Sequence[tuple[str, str]]) -> list[tuple[re.Pattern, str]]:
    if isinstance(rules, (str, Mapping)) or not isinstance(rules, Sequence):
        raise PartitionError(f"rules {rules!r} must be a list of (regex, label) pairs, e.g. [(r'/lora_', 'lora')], "
                             "or a function (path, leaf) -> label")
    compiled = []
    for i, rule in enumerate(rules):
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2):
            raise PartitionError(f"rule #{i} {rule!r} must be a (regex, label) pair")
        pattern, group = rule
        if not isinstance(pattern, str):
            raise PartitionError(f"rule #{i} {rule!r}: the regex {pattern!r} must be a string, e.g. (r'/lora_', "
                                 "'lora')")
        try:
            compiled.append((re.compile(pattern), group))
        except re.error as e:
            raise PartitionError(f"rule #{i} regex {pattern!r} does not compile: {e}; "
                                 "fix the pattern (it is a Python `re` regex over '/'-joined "
                                 "parameter paths)") from None
    return compiled


def label(params, rules: Rules, default: str | None = None):
    """Label every leaf of `params`; returns a tree of strings with the same structure.

    `rules` is either an ordered list of ``(regex, label)`` pairs, where the first
    regex that `re.search`-es a leaf's path gives its label, or a callable
    ``(path, leaf) -> label`` (returning None for "no opinion"). Leaves no rule
    covers get `default`; with no default they are an error. A regex rule that matches no leaf at all is an error (it is
    almost always a typo), and so is a label that is not a non-empty string.
    """
    flat = flatten(params)
    if callable(rules):
        labels = {p: rules(p, leaf) for p, leaf in flat.items()}
        labels = {p: default if g is None else g for p, g in labels.items()}
    else:
        compiled = compile_rules(rules)
        labels = {p: next((g for regex, g in compiled if regex.search(p)), default)
                  for p in flat}
        for regex, group in compiled:
            if not any(regex.search(p) for p in flat):
                raise PartitionError(
                    f"rule ({regex.pattern!r} -> {group!r}) matches no parameter; "
                    f"nearest paths: {nearest_paths(regex.pattern, list(flat))}")
    uncovered = [p for p, g in labels.items() if g is None]
    if uncovered:
        raise PartitionError(
            f"{len(uncovered)} parameter(s) covered by no rule, e.g. {uncovered[:3]}; "
            f"add a rule for them or a catch-all such as ('.*', '{FROZEN}')")
    bad = {p: g for p, g in labels.items() if not (isinstance(g, str) and g)}
    if bad:
        p, g = next(iter(bad.items()))
        raise PartitionError(f"label for {p!r} is {g!r}; labels must be non-empty strings")
    leaves = [labels[p] for p in flat]
    return jax.tree.unflatten(jax.tree.structure(params), leaves)


def check_labels(params, labels, who: str):
    """`labels` must be a label tree of `params`: a leaf for each of its leaves, at the same paths."""
    have, want = flatten(labels), flatten(params)
    if have.keys() != want.keys():
        odd = next((f"{p!r} has no label" for p in want if p not in have), None) or \
            f"label {next(p for p in have if p not in want)!r} names no parameter"
        raise PartitionError(f"{who}: the labels are not a label tree of these parameters ({odd}); make them "
                             "from the same parameters with method.labels(params) or partition.label(params, rules)")


def groups(labels) -> list[str]:
    """The trainable labels present in a label tree, in first-seen order."""
    return list(dict.fromkeys(g for g in jax.tree.leaves(labels) if g != FROZEN))


def require_trainable(labels, who: str = "the labelling"):
    if not groups(labels):
        raise PartitionError(f"{who} leaves zero trainable parameters; every leaf is "
                             f"{FROZEN!r}. Check the method's rules or targets.")


def _select(tree, keep: Callable[[Any], bool], labels):
    """Nested dicts holding only the leaves whose label passes `keep` (empty dicts pruned)."""
    if isinstance(tree, Mapping):
        out = {}
        for k, v in tree.items():
            sub = _select(v, keep, labels[k])
            if not (isinstance(sub, dict) and not sub):
                out[k] = sub
        return out
    return tree if keep(labels) else {}


def split(params, labels):
    """(trainable, frozen): two nested dicts that together hold every leaf once."""
    check_labels(params, labels, "split")
    return (_select(params, lambda g: g != FROZEN, labels),
            _select(params, lambda g: g == FROZEN, labels))


def select(params, labels, group: str):
    """The subtree of leaves labelled `group`."""
    return _select(params, lambda g: g == group, labels)


def merge(*trees):
    """Deep union of nested dicts; a leaf present in two trees is an error."""
    out: dict = {}
    for tree in trees:
        for k, v in tree.items():
            if k not in out:
                out[k] = v
            elif isinstance(out[k], Mapping) and isinstance(v, Mapping):
                out[k] = merge(out[k], v)
            else:
                raise PartitionError(f"merge: {k!r} is present in more than one tree")
    return out


def cast(params, labels, dtype, group: str = FROZEN):
    """`params` with the leaves labelled `group` cast to `dtype`; every other leaf, and a leaf
    that already has `dtype`, is the same object as before (no copy)."""
    dtype = jnp.dtype(dtype)
    return jax.tree.map(lambda x, g: x.astype(dtype) if g == group and x.dtype != dtype else x, params, labels)


def nbytes(leaf) -> int:
    return int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize


@dataclasses.dataclass(frozen=True)
class Summary:
    """Counts and bytes per label; `str()` prints it like PEFT's print_trainable_parameters."""
    count: dict[str, int]
    bytes: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.count.values())

    @property
    def trainable(self) -> int:
        return sum(c for g, c in self.count.items() if g != FROZEN)

    @property
    def trainable_bytes(self) -> int:
        return sum(b for g, b in self.bytes.items() if g != FROZEN)

    @property
    def trainable_fraction(self) -> float:
        return self.trainable / max(self.total, 1)

    def __str__(self):
        rows = [f"{'label':<12}{'params':>16}{'bytes':>14}"]
        for g in sorted(self.count, key=lambda g: (g == FROZEN, g)):
            rows.append(f"{g:<12}{self.count[g]:>16,}{human_bytes(self.bytes[g]):>14}")
        rows.append(f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
                    f"trainable%: {100 * self.trainable_fraction:.4f} || "
                    f"trainable bytes: {human_bytes(self.trainable_bytes)}")
        return "\n".join(rows)


def summary(params, labels) -> Summary:
    """Parameter count and bytes per label. Works on arrays or `jax.ShapeDtypeStruct`s."""
    check_labels(params, labels, "summary")
    count: dict[str, int] = {}
    size: dict[str, int] = {}
    for leaf, g in zip(jax.tree.leaves(params), jax.tree.leaves(labels)):
        count[g] = count.get(g, 0) + int(np.prod(leaf.shape))
        size[g] = size.get(g, 0) + nbytes(leaf)
    return Summary(count, size)


def human_bytes(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
