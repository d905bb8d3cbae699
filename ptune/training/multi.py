"""K runs in one job: the trainable subtrees of K configs that differ only in seeds, learning
rates or task data are stacked along a leading axis, and `jax.vmap` maps the train step over
them against one frozen base.

What each kind of difference becomes:
  seed            per-point init of the sites, dropout rng and data order (per-point batches)
  learning rates  optimizer state (optim.build(inject=True)), so one update function serves all
  task data       per-point batches and evaluation (the batch shapes must agree)
The frozen base is shared when it is identical in every point (a pretrained checkpoint); a
random-init base depends on the seed, so points with different seeds each keep their own
(stacked, K times the memory). Each point writes the same workdir files as a separate run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ptune import partition
from ptune.data import batching
from ptune.errors import UserError
from ptune.training import builder, checkpoint, compute, stopping, train
from ptune.training import workdir as workdir_lib

# Config keys whose values vmap can batch: they change only array values, not the computation.
# The final evaluation suite (eval.*) runs per point after training, so it may differ too.
_BATCHABLE = re.compile(r"seed|optim\.(groups\.[^.]+\.)?(learning_rate|lr_scale)|task\..+|train\.progress|eval\..+")


def batchable(key: str) -> bool:
    """Whether points differing in config `key` can train vmapped together."""
    return bool(_BATCHABLE.fullmatch(key))


@dataclasses.dataclass
class Multi:
    """K runs set up to train together; `trainable` and `opt_state` have a leading axis K."""
    runs: list[builder.Run]        # per point; `params` hold shapes only (the arrays are below)
    trainable: dict
    opt_state: Any
    frozen: dict                 # shared, or stacked along axis 0 when the points' bases differ
    frozen_axis: int | None

    def point(self, trainable, i: int) -> dict:
        """Point i's full parameter tree from the stacked `trainable`."""
        take = lambda x: x[i]
        frozen = self.frozen if self.frozen_axis is None else jax.tree.map(take, self.frozen)
        return partition.merge(jax.tree.map(take, trainable), frozen)


def flat_config(config) -> dict:
    """{dotted key: value} for every leaf of a config."""
    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, dict):
                yield from walk(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v
    return dict(walk(config.to_dict(), ""))


def differing_keys(a, b) -> list[str]:
    fa, fb = flat_config(a), flat_config(b)
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))


def setup(configs) -> Multi:
    """Set up every config (builder.setup validates each) and stack their trainable subtrees.

    Errors name the config keys at fault: points whose shapes differ (trainable leaves or
    batches), or that differ in a key vmap cannot batch (see `batchable`).
    """
    if len(configs) < 2:
        raise UserError(f"vmapping needs at least 2 points, got {len(configs)}")
    runs, trainables, opt_states, frozens = [], [], [], []
    for i, config in enumerate(configs):
        run = builder.setup(config)
        if run.mesh.size > 1:
            raise UserError(f"vmapped points run on one device, but config.mesh of point {i} spans "
                            f"{run.mesh.size}; set config.mesh.data=1 (fsdp and tensor too) or run without --vmap")
        if not run.method.trains:
            raise UserError(f"method {run.method.name!r} trains nothing; there is nothing to vmap")
        run = dataclasses.replace(run, tx=builder.optimizer(config, run.method, run.labels, inject=True))
        trainable, frozen = partition.split(run.params, run.labels)
        if i:
            _check_compatible(runs[0], trainables[0], run, trainable, i)
        # A base equal to point 0's is not kept: with a pretrained checkpoint, one base serves all.
        frozens.append(frozen if i == 0 or not _equal(frozens[0], frozen) else frozens[0])
        runs.append(dataclasses.replace(run, params=jax.tree.map(_shape, run.params)))
        trainables.append(trainable)
        opt_states.append(run.tx.init(trainable))
    stack = lambda *xs: jnp.stack(xs)
    if all(f is frozens[0] for f in frozens):
        frozen, frozen_axis = frozens[0], None
    else:   # the bases differ (a random init depends on the seed): one per point
        frozen, frozen_axis = jax.tree.map(stack, *frozens), 0
    return Multi(runs, jax.tree.map(stack, *trainables), jax.tree.map(stack, *opt_states), frozen, frozen_axis)


def _shape(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype)


def _equal(a, b) -> bool:
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _check_compatible(first: builder.Run, first_trainable, run: builder.Run, trainable, i: int):
    keys = differing_keys(first.config, run.config)

    def fail(what):
        raise UserError(f"vmapped points 0 and {i} differ in {keys}, which {what}; vmap them separately "
                        "or run them without --vmap")

    shapes = lambda tree: {p: f"{x.shape} {x.dtype}" for p, x in partition.flatten(tree).items()}
    a, b = shapes(first_trainable), shapes(trainable)
    if a != b:
        path = next(p for p in [*a, *b] if a.get(p) != b.get(p))
        fail(f"changes the shape of trainable {path}: {a.get(path, 'absent')} vs {b.get(path, 'absent')}")
    for split in first.data:
        for name, x in first.data[split].items():
            y = run.data[split][name]
            if x.shape[1:] != y.shape[1:]:
                fail(f"changes the {split} batch shape of {name}: {x.shape[1:]} vs {y.shape[1:]}")
    unbatchable = [k for k in keys if not batchable(k)]
    if unbatchable:
        keys = unbatchable
        fail("vmap cannot batch (it batches seed, learning rates and task data)")
    if (first.objective, first.label_ids) != (run.objective, run.label_ids):
        fail(f"changes the objective or its label tokens ({first.objective} {first.label_ids} vs "
             f"{run.objective} {run.label_ids}), which vmap cannot batch")


def make_train_step(multi: Multi, chunk: int | None = None):
    """jit(vmap(compute.train_step_fn)): every argument but a shared frozen base has a leading axis K.

    `chunk`: how many points are computed at once (default: all K). Activation memory grows with
    it; smaller chunks run one after another inside the step (lax.map), trading speed for memory.
    """
    step = compute.train_step_fn(multi.runs[0])   # the points differ only in values vmap batches
    if chunk is None or chunk >= len(multi.runs):
        return jax.jit(jax.vmap(step, in_axes=(0, 0, multi.frozen_axis, 0, 0)), donate_argnums=(0, 1))

    def chunked(trainable, opt_state, frozen, batch, rng):
        shared = multi.frozen_axis is None
        point = lambda xs: step(xs[0], xs[1], frozen if shared else xs[2], xs[3], xs[4])
        return jax.lax.map(point, (trainable, opt_state, None if shared else frozen, batch, rng), batch_size=chunk)
    return jax.jit(chunked, donate_argnums=(0, 1))


def train_and_evaluate(configs, workdirs, chunk: int | None = None) -> list[dict]:
    """Train K configs together; each point's workdir gets exactly what train.train_and_evaluate
    writes for it (config.json, metrics.jsonl, final_metrics.json), except checkpoints: vmapped
    points are not checkpointed (a sweep reruns an unfinished group). Returns the final metrics.
    `chunk`: see make_train_step."""
    multi = setup(configs)
    with contextlib.ExitStack() as owned:
        for workdir in workdirs:
            workdir_lib.prepare(workdir)
            owned.enter_context(workdir_lib.owned(workdir))
            checkpoint.truncate_metrics(workdir, -1)   # the points start afresh (no checkpoints)
        return _train_and_evaluate(multi, workdirs, chunk)


def _train_and_evaluate(multi: Multi, workdirs, chunk: int | None) -> list[dict]:
    runs, tc = multi.runs, multi.runs[0].config.train
    started = [workdir_lib.start(run, workdir) for run, workdir in zip(runs, workdirs)]
    if runs[0].config.checkpoint.every_steps:
        print(f"note: the {len(runs)} vmapped points write no checkpoints (config.checkpoint is not used)", flush=True)
    train_step, eval_step = make_train_step(multi, chunk), compute.make_eval_step(runs[0])
    seeds = [run.config.seed for run in runs]
    dropout_keys = jnp.stack([compute.dropout_key(s) for s in seeds])
    fold_in = jax.vmap(jax.random.fold_in, in_axes=(0, None))

    def step_fn(state, step):
        batches = [batching.batch_at(run.data["train"], step, tc.batch_size, s) for run, s in zip(runs, seeds)]
        batch = {k: np.stack([b[k] for b in batches]) for k in batches[0]}
        *state, metrics = train_step(*state, multi.frozen, batch, fold_in(dropout_keys, step))
        return tuple(state), metrics

    evaluated = [None] * len(runs)
    best = stopping.Best(runs[0].config, len(runs)) if tc.patience else None
    state, done = (multi.trainable, multi.opt_state), 0
    for done, state, logged in train.train_steps(tc, step_fn, state, 0, f"{len(runs)} x {runs[0].method.name}", True):
        for i, (writer, final) in enumerate(started):
            if best and best.stopped_step[i] is not None:
                continue   # this point's run has ended; its vmapped steps go on for the others
            if logged:
                metrics = logged.train_metrics(tc.batch_size, point=i)
                if metrics["skipped_steps"] and tc.nonfinite == "stop":
                    raise UserError(f"point {i} ({workdirs[i]}): {metrics['skipped_steps']} of training steps "
                                    f"{done - logged.steps + 1}..{done} had a non-finite loss or gradients and "
                                    "were not applied; lower its learning rate, or set "
                                    "config.train.nonfinite='skip' to leave such steps out")
                writer.write(done, "train", metrics)
                final["train_loss"] = metrics["loss"]
            if done % tc.eval_every == 0 or done == tc.steps:
                evaluated[i] = compute.evaluate(runs[i], multi.point(state[0], i), tc.eval_split, eval_step)
                writer.write(done, tc.eval_split, evaluated[i])
        if best and (done % tc.eval_every == 0 or done == tc.steps):
            best.update(done, evaluated, state[0])
            if best.stop:
                break
    trained = state[0]
    if best:   # each point ends on its best evaluation
        trained, evaluated = best.trainable, best.metrics
        for i, (_, final) in enumerate(started):
            final.update(best.final(i, done))
    return [workdir_lib.finish(run, writer, final, workdir, metrics, multi.point(trained, i))
            for i, (run, (writer, final), workdir, metrics) in enumerate(zip(runs, started, workdirs, evaluated))]
