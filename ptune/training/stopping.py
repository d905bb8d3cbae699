"""Early stopping: the best evaluation of a run (or of each of K vmapped runs) and when to stop.

With `config.train.patience` = p > 0, training stops once a run has gone p evaluations (every
`train.eval_every` steps) without beating its best `config.checkpoint.best_metric` (in the
direction `best_mode`), and the run ends on the parameters of that best evaluation: the final
evaluation suite (test split, templates, ...) measures them. K vmapped runs stop when all K have;
a run that has stopped keeps its best even if its vmapped steps go on.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp


class Best:
    """The best evaluation so far of one run (`points=None`: trainable has no leading axis) or of K
    vmapped runs (`points=K`: trainable leaves have a leading axis K)."""

    def __init__(self, config, points: int | None = None):
        self.metric, self.mode = config.checkpoint.best_metric, config.checkpoint.best_mode
        self.patience, self.points = config.train.patience, points
        n = points or 1
        self.value, self.step, self.metrics = [None] * n, [0] * n, [None] * n
        self.waited, self.stopped_step = [0] * n, [None] * n
        self.trainable = None   # the best parameters (a device copy: training donates its buffers)

    def _better(self, value, best) -> bool:
        return best is None or (value > best if self.mode == "max" else value < best)

    def update(self, step: int, evaluated: list[dict], trainable=None) -> list[bool]:
        """Record the evaluations of `step` (one dict per run); keep `trainable` where one improved.
        Returns which runs improved."""
        improved = []
        for i, metrics in enumerate(evaluated):
            better = self.stopped_step[i] is None and self._better(metrics[self.metric], self.value[i])
            if better:
                self.value[i], self.step[i], self.metrics[i], self.waited[i] = metrics[self.metric], step, metrics, 0
            elif self.stopped_step[i] is None:
                self.waited[i] += 1
                if self.waited[i] >= self.patience:
                    self.stopped_step[i] = step
            improved.append(better)
        if trainable is not None and any(improved):
            self.keep(trainable, improved)
        return improved

    def keep(self, trainable, improved: list[bool] | None = None):
        """Keep `trainable` as the best parameters (of the runs that `improved`; all by default)."""
        if self.points is None or self.trainable is None or improved is None:
            self.trainable = jax.tree.map(jnp.copy, trainable)
            return
        mask = jnp.asarray(improved)
        self.trainable = jax.tree.map(
            lambda new, old: jnp.where(mask.reshape((-1,) + (1,) * (new.ndim - 1)), new, old),
            trainable, self.trainable)

    @property
    def stop(self) -> bool:
        """Every run has gone `patience` evaluations without improving."""
        return all(s is not None for s in self.stopped_step)

    def final(self, i: int = 0, steps_done: int | None = None) -> dict:
        """Run i's record for final_metrics.json: the step of its best evaluation (whose metrics the
        run reports), and the step it stopped at (`steps_done` when patience never ran out)."""
        return {"best_step": self.step[i], "stopped_step": self.stopped_step[i] or steps_done}

    def replay(self, workdir: str, split: str):
        """Rebuild the record of one resumed run from its metrics.jsonl evaluations (already cut back
        to the checkpoint it resumes from); the best parameters are restored by the caller."""
        path = os.path.join(workdir, "metrics.jsonl")
        if os.path.exists(path):
            with open(path) as f:
                for record in map(json.loads, f):
                    if record["split"] == split:
                        self.update(record["step"], [record])
