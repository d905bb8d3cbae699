"""Optimizers built from labels: one optax transformation per trainable group.

Frozen leaves are never seen here: the train step differentiates and updates
only the trainable subtree (`partition.split`), so no optimizer state exists for
them. `optax.partition` routes each trainable leaf to its group's optimizer,
which gives per-group learning rates and schedules (e.g. Lester et al.'s large
prompt learning rate, LoRA+'s higher rate for B).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import optax

from ptune import partition
from ptune.errors import UserError


@dataclasses.dataclass(frozen=True)
class Group:
    """One optimizer group. `lr_scale` multiplies `learning_rate` (LoRA+ uses it for B)."""
    optimizer: str = "adamw"           # adamw | adam | sgd | adafactor
    learning_rate: float = 1e-3
    lr_scale: float = 1.0
    schedule: str = "constant"         # constant | linear | cosine (decay to 0 after warmup)
    warmup_steps: int = 0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    momentum: float = 0.0              # sgd

    def __post_init__(self):
        lr = self.learning_rate * self.lr_scale
        if not (math.isfinite(lr) and lr > 0):
            raise UserError(f"learning_rate={self.learning_rate} x lr_scale={self.lr_scale} must be a "
                            "finite number > 0")
        for key, (ok, wanted) in _RANGES.items():
            value = getattr(self, key)
            number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not (number and ok(value)):
                raise UserError(f"{key}={value!r} must be {wanted}")
        if self.optimizer not in _OPTIMIZERS:
            raise UserError(f"optimizer={self.optimizer!r} is unknown; choose one of {sorted(_OPTIMIZERS)}")
        if self.schedule not in _SCHEDULES:
            raise UserError(f"schedule={self.schedule!r} is unknown; choose one of {sorted(_SCHEDULES)}")


_RANGES = {   # field -> (test of a finite number, what it must be)
    "warmup_steps": (lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
    "weight_decay": (lambda v: v >= 0, "a finite number >= 0"),
    "b1": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "b2": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "eps": (lambda v: v > 0, "a finite number > 0"),
    "momentum": (lambda v: v >= 0, "a finite number >= 0"),
}

_SCHEDULES = {
    "constant": lambda lr, steps: optax.constant_schedule(lr),
    "linear": lambda lr, steps: optax.linear_schedule(lr, 0.0, max(steps, 1)),
    "cosine": lambda lr, steps: optax.cosine_decay_schedule(lr, max(steps, 1)),
}

_OPTIMIZERS = {
    "adamw": lambda g, lr: optax.adamw(lr, g.b1, g.b2, g.eps, weight_decay=g.weight_decay),
    "adam": lambda g, lr: optax.adam(lr, g.b1, g.b2, g.eps),
    "sgd": lambda g, lr: optax.sgd(lr, g.momentum or None),
    "adafactor": lambda g, lr: optax.adafactor(lr, weight_decay_rate=g.weight_decay or None),
}


def schedule(group: Group, total_steps: int) -> optax.Schedule:
    lr = group.learning_rate * group.lr_scale
    decay = _SCHEDULES[group.schedule](lr, total_steps - group.warmup_steps)
    if not group.warmup_steps:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, group.warmup_steps), decay],
                                [group.warmup_steps])


def transform(group: Group, total_steps: int, inject: bool = False) -> optax.GradientTransformation:
    """The group's optimizer with its schedule. `inject`: the peak learning rate is optimizer state
    (`state.hyperparams["learning_rate"]`, via optax.inject_hyperparams) rather than a constant
    of the update function, so runs that differ only in learning rates share one update function
    and can be vmapped together (ptune.training.multi)."""
    if not inject:
        return _OPTIMIZERS[group.optimizer](group, schedule(group, total_steps))
    unit = schedule(dataclasses.replace(group, learning_rate=1.0, lr_scale=1.0), total_steps)

    def with_peak(learning_rate):
        return _OPTIMIZERS[group.optimizer](group, lambda count: learning_rate * unit(count))
    return optax.inject_hyperparams(with_peak)(learning_rate=group.learning_rate * group.lr_scale)


def build(labels, groups: dict[str, Group], total_steps: int, clip_norm: float | None = None,
          inject: bool = False):
    """An optax transformation over the trainable subtree of `labels` (`inject`: see `transform`).

    Every trainable label needs a group and every group a label present in the
    tree; either mismatch is an error naming the culprit.
    """
    present = partition.groups(labels)
    partition.require_trainable(labels)
    missing = [g for g in present if g not in groups]
    if missing:
        raise partition.PartitionError(
            f"label(s) {missing} have no optimizer group; add optim.groups.{missing[0]} "
            f"(groups given: {sorted(groups)})")
    unused = [g for g in groups if g not in present]
    if unused:
        raise partition.PartitionError(
            f"optimizer group(s) {unused} match no trainable label; labels present: {present}")
    transforms = {g: transform(groups[g], total_steps, inject) for g in present}
    tx = optax.partition(transforms, partition.split(labels, labels)[0])
    return optax.chain(optax.clip_by_global_norm(clip_norm), tx) if clip_norm else tx


def state_size(opt_state) -> int:
    """Number of floats the optimizer state holds (step counters excluded)."""
    return sum(x.size for x in jax.tree.leaves(opt_state) if getattr(x, "ndim", 0) > 0)
