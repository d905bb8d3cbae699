"""Adapter arithmetic: LoRA adapters combined into one, as PEFT 0.21's `LoraModel.add_weighted_adapter`
combines them (tests/test_arithmetic.py holds the result to PEFT's within 1e-5).

    import ptune
    from ptune import methods
    from ptune.interop import arithmetic
    runs = [ptune.load_adapter(w) for w in ("workdirs/sentiment", "workdirs/style")]   # LoRA runs, one base
    mixed = arithmetic.combine([arithmetic.LoraAdapter.of(run.method, run.trainable) for run in runs],
                               weights=[0.7, 0.3], combination_type="ties", density=0.5)
    method = methods.get("lora", runs[0].model.config, **mixed.options)   # rank, alpha, rslora, targets
    # mixed.params is that method's trainable subtree: partition.merge it with the frozen base
    # (then hf_peft.export the whole tree for PEFT, or hf_peft.merge it into the base weights).

Combination types, with PEFT's names and semantics:
- factor-wise (`linear`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune`): the adapters' A
  factors are merged with weights sign(w s) sqrt(|w s|) and their B factors with sqrt(|w s|), where
  s is each adapter's LoRA scale; all adapters need one rank. Cheap, but only an approximation of
  the weighted sum of the adapters' updates (the cross terms A_i B_j are lost).
- `cat`: A factors scaled by w s and stacked with the B factors: the exact weighted sum, of rank
  the sum of the ranks.
- SVD-based (`svd`, the default, `ties_svd`, `dare_linear_svd`, `dare_ties_svd`,
  `magnitude_prune_svd`): the updates s A B merged with the weights w, then truncated by SVD to
  `svd_rank` (default: the largest rank), optionally clamped at the `svd_clamp` quantile.
`ties` and `magnitude_prune` keep each tensor's `density` fraction of largest magnitudes; `dare_*`
keep each entry with probability `density` and rescale by 1/density (drawn from `seed`, so unlike
PEFT's, which draws from torch's global generator, a result is reproducible); the `*ties*` types
keep, per entry, the adapters agreeing with the majority sign (`majority_sign_method`).

As in PEFT, the result has alpha = rank (a scale of 1, or sqrt(rank) when the first adapter is
rsLoRA), covers every module some adapter covers (each module combines the adapters that have it;
`cat` pads with zero rows), and a single adapter is always combined `linear`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ptune import partition
from ptune.errors import UserError

FACTOR_WISE = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_BASED = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATION_TYPES = (*FACTOR_WISE, "cat", *SVD_BASED)
SIGN_METHODS = ("total", "frequency")
LEAVES = ("lora_a", "lora_b")


@dataclasses.dataclass(frozen=True)
class LoraAdapter:
    """One LoRA adapter: `params`, a tree of `<module>/lora_a` (in, r) and `<module>/lora_b` (r, out)
    leaves and nothing else (a LoRA method's trainable subtree), and the options that scale it as
    ptune's `lora` method does: alpha / r, or alpha / sqrt(r) with `rslora`."""
    params: Any
    alpha: float
    rslora: bool = False

    def __post_init__(self):
        if not self.alpha > 0:
            raise UserError(f"LoraAdapter: alpha={self.alpha!r} must be > 0 (the lora method's alpha)")
        ranks = {a.shape[1] for a, _ in _factors(self.params).values()}
        if len(ranks) != 1:
            raise UserError(f"LoraAdapter: its modules have ranks {sorted(ranks)}; one adapter has one rank "
                            "(ptune's lora method gives every target the same)")

    @classmethod
    def of(cls, method, trainable) -> LoraAdapter:
        """The adapter of a ptune LoRA `method` whose trainable subtree is `trainable`: `Tuner.method`
        and `Tuner.trainable`, or what `hf_peft.load` returns."""
        lora = method.sites.lora
        if lora is None:
            raise UserError(f"method {method.name!r} has no LoRA sites; adapter arithmetic combines LoRA adapters")
        adapter = cls(trainable, lora.alpha, lora.rslora)
        if adapter.rank != lora.rank:
            raise UserError(f"the trainable subtree has rank {adapter.rank} but method {method.name!r} has rank "
                            f"{lora.rank}; pass the trainable subtree of that method's run")
        return adapter

    @property
    def rank(self) -> int:
        return next(iter(_factors(self.params).values()))[0].shape[1]

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    @property
    def options(self) -> dict:
        """`methods.get("lora", model_config, **options)` is the method whose trainable subtree is `params`."""
        return {"rank": self.rank, "alpha": self.alpha, "rslora": self.rslora, "targets": sorted(_factors(self.params))}

    def deltas(self) -> dict[str, np.ndarray]:
        """Per module path, the update this adapter adds to the layer's (in, out) kernel: scale * A B."""
        return {module: self.scale * (a @ b) for module, (a, b) in _factors(self.params).items()}


def combine(adapters: Sequence[LoraAdapter], weights: Sequence[float], combination_type: str = "svd", *,
            svd_rank: int | None = None, svd_clamp: float | None = None, density: float | None = None,
            majority_sign_method: str = "total", seed: int = 0) -> LoraAdapter:
    """One LoRA adapter from `adapters` and their `weights` (negative ones subtract), as PEFT's
    `add_weighted_adapter(adapters, weights, name, combination_type, svd_rank, svd_clamp, density=,
    majority_sign_method=)` makes it (see the module docstring). Its leaves are float32; `seed`
    draws the DARE masks."""
    kind = _check(adapters, weights, combination_type, svd_rank, svd_clamp, density, majority_sign_method)
    factors = [_factors(adapter.params) for adapter in adapters]
    _check_shapes(factors)
    ranks = [adapter.rank for adapter in adapters]
    rank = sum(ranks) if kind == "cat" else (svd_rank or max(ranks)) if kind in SVD_BASED else ranks[0]
    rng, combined = np.random.default_rng(seed), {}
    merge_kind = "linear" if kind == "svd" else kind.removesuffix("_svd")   # how the SVD types merge updates

    def merge(tasks, task_weights):
        return _merge(merge_kind, tasks, np.asarray(task_weights, np.float32), density, majority_sign_method, rng)

    for module in sorted(set().union(*factors)):
        present = [(weight, adapter.scale, *f[module]) for adapter, weight, f in zip(adapters, weights, factors)
                   if module in f]
        if kind == "cat":
            a, b = _concatenate(present, rank)
        elif kind in SVD_BASED:
            a, b = _truncated_svd(merge([s * (a @ b) for _, s, a, b in present], [w for w, *_ in present]),
                                  rank, svd_clamp, module)
        else:   # the sign goes on A only, so that a negative weight does not cancel itself out
            a = merge([a for *_, a, _ in present], [math.copysign(math.sqrt(abs(w * s)), w * s)
                                                    for w, s, *_ in present])
            b = merge([b for *_, b in present], [math.sqrt(abs(w * s)) for w, s, *_ in present])
        combined.update({f"{module}/lora_a": a.astype(np.float32), f"{module}/lora_b": b.astype(np.float32)})
    return LoraAdapter(partition.unflatten(combined), alpha=float(rank), rslora=adapters[0].rslora)


def _factors(params) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{module path: (A (in, r), B (r, out))} as float32, checking that `params` holds LoRA pairs only."""
    flat = {path: np.asarray(x, np.float32) for path, x in partition.flatten(params).items()}
    other = [path for path in flat if path.rpartition("/")[2] not in LEAVES]
    if other or not flat:
        found = f"the leaf {other[0]!r}, which is not" if other else "no leaves, and needs"
        raise UserError(f"a LoRA adapter holds lora_a/lora_b leaves only; it has {found} one: pass only the LoRA "
                        "leaves (PEFT's add_weighted_adapter does not combine task heads or other sites either)")
    factors = {}
    for module in sorted({path.rpartition("/")[0] for path in flat}):
        a, b = flat.get(f"{module}/lora_a"), flat.get(f"{module}/lora_b")
        if a is None or b is None or a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
            shapes = {leaf: getattr(flat.get(f"{module}/{leaf}"), "shape", "missing") for leaf in LEAVES}
            raise UserError(f"LoRA module {module!r} has lora_a {shapes['lora_a']} and lora_b {shapes['lora_b']}; "
                            "it needs both, (in, r) and (r, out): pass the adapter's trainable subtree unchanged")
        factors[module] = a, b
    return factors


def _check(adapters, weights, combination_type, svd_rank, svd_clamp, density, majority_sign_method) -> str:
    """The combination type that applies (PEFT combines a single adapter `linear`); raises on bad input."""
    if not adapters or not all(isinstance(adapter, LoraAdapter) for adapter in adapters):
        raise UserError("combine: adapters must be a non-empty list of LoraAdapter (make each with "
                        "LoraAdapter.of(method, trainable) or LoraAdapter(params, alpha))")
    if len(weights) != len(adapters) or not all(math.isfinite(w) for w in weights):
        raise UserError(f"combine: weights={list(weights)!r} must be {len(adapters)} finite numbers, one per adapter")
    if combination_type not in COMBINATION_TYPES:
        raise UserError(f"combine: combination_type={combination_type!r}; choose one of {COMBINATION_TYPES}")
    if majority_sign_method not in SIGN_METHODS:
        raise UserError(f"combine: majority_sign_method={majority_sign_method!r}; choose one of {SIGN_METHODS}")
    kind = "linear" if len(adapters) == 1 else combination_type
    prunes = kind.startswith(("ties", "dare", "magnitude"))
    if (prunes or density is not None) and not (isinstance(density, (int, float)) and 0 < density <= 1):
        raise UserError(f"combine: density={density!r}; {kind!r} needs the fraction of entries to keep, in (0, 1]"
                        if prunes else f"combine: density={density!r} must be in (0, 1]")
    ranks = [adapter.rank for adapter in adapters]
    if kind in FACTOR_WISE and len(set(ranks)) > 1:
        raise UserError(f"combine: {kind!r} merges the A and B factors entry by entry, so the adapters need one "
                        f"rank, and theirs are {ranks}; use 'cat' or an SVD-based type ('svd', 'ties_svd'...)")
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1):
        raise UserError(f"combine: svd_rank={svd_rank!r} must be a positive integer (or None: the largest rank)")
    if svd_clamp is not None and not 0 <= svd_clamp <= 1:
        raise UserError(f"combine: svd_clamp={svd_clamp!r} is a quantile, in [0, 1] (or None: no clamping)")
    return kind


def _check_shapes(factors: list[dict]):
    """Adapters that share a module must agree on its (in, out): else they adapt different models."""
    seen = {}
    for i, adapter in enumerate(factors):
        for module, (a, b) in adapter.items():
            first, shape = seen.setdefault(module, (i, (a.shape[0], b.shape[1])))
            if shape != (a.shape[0], b.shape[1]):
                raise UserError(f"combine: at {module!r} adapter {first} maps {shape[0]} -> {shape[1]} features and "
                                f"adapter {i} {a.shape[0]} -> {b.shape[1]}: they were trained on different base "
                                "models; combine adapters of one base model")


def _concatenate(present, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """`cat`: [w s A_1 | w s A_2 ...] and [B_1; B_2 ...], zero-padded to `rank` (adapters that lack
    the module leave their rows empty)."""
    a = np.concatenate([a * (w * s) for w, s, a, _ in present], axis=1)
    b = np.concatenate([b for *_, b in present], axis=0)
    pad = rank - a.shape[1]
    return np.pad(a, ((0, 0), (0, pad))), np.pad(b, ((0, pad), (0, 0)))


def _truncated_svd(delta: np.ndarray, rank: int, clamp: float | None, module: str) -> tuple[np.ndarray, np.ndarray]:
    """A (in, rank), B (rank, out) with A B the best rank-`rank` approximation of `delta` (in, out),
    the singular values on B as PEFT puts them, both clamped to [-q, q] for q the `clamp` quantile of
    their entries."""
    if rank > min(delta.shape):
        raise UserError(f"combine: svd_rank={rank} exceeds the smaller side of {module!r}'s {delta.shape} update; "
                        f"choose svd_rank <= {min(delta.shape)}")
    u, singular, vh = np.linalg.svd(delta, full_matrices=False)
    a, b = u[:, :rank], singular[:rank, None] * vh[:rank]
    # LAPACK builds choose the singular vectors' signs differently (numpy's OpenBLAS and torch's MKL
    # do here), and the clamp depends on them: fix them, each column of A with its largest entry > 0.
    flip = np.sign(a[np.abs(a).argmax(0), np.arange(rank)])
    a, b = a * flip, b * flip[:, None]
    if clamp is not None:
        high = np.quantile(np.concatenate([b.ravel(), a.ravel()]), clamp)
        a, b = np.clip(a, -high, high), np.clip(b, -high, high)
    return a, b


def _merge(kind: str, tasks: list[np.ndarray], weights: np.ndarray, density, sign_method: str, rng) -> np.ndarray:
    """PEFT's merge_utils on one module's task tensors: prune each, weight them, and sum them, or
    for TIES average the entries that agree with the majority sign."""
    if kind in ("ties", "magnitude_prune"):
        tasks = [_magnitude_prune(task, density) for task in tasks]
    elif kind.startswith("dare"):
        tasks = [_random_prune(task, density, rng) for task in tasks]
    stacked = np.stack(tasks)
    weighted = stacked * weights.reshape(-1, *[1] * tasks[0].ndim)
    if kind not in ("ties", "dare_ties"):
        return weighted.sum(0)
    sign = np.sign(stacked)   # the majority sign is elected before weighting, as PEFT does
    majority = np.where((stacked if sign_method == "total" else sign).sum(0) >= 0, 1, -1)
    agree = sign == majority
    return (weighted * agree).sum(0) / np.maximum(agree.sum(0), 1)


def _magnitude_prune(task: np.ndarray, density: float) -> np.ndarray:
    """The int(density * size) entries of largest magnitude; the others zero."""
    keep = np.argsort(-np.abs(task), axis=None, kind="stable")[: int(density * task.size)]
    pruned = np.zeros(task.size, task.dtype)
    pruned[keep] = task.ravel()[keep]
    return pruned.reshape(task.shape)


def _random_prune(task: np.ndarray, density: float, rng: np.random.Generator) -> np.ndarray:
    """DARE: each entry kept with probability `density` and rescaled by 1 / density (kept in expectation)."""
    return np.where(rng.random(task.shape) < density, task / np.float32(density), np.float32(0))
