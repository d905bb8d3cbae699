"""The computations of a run: where its arrays live on the mesh (`Layout`), the train step (pure,
so that it can be jitted for one run or vmapped over K), the eval step and evaluation."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from ptune import models, partition, sharding
from ptune.data import batching
from ptune.training import objectives
from ptune.training.builder import Run


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where each array of a run lives on the mesh (see ptune.sharding)."""
    trainable: Any
    frozen: Any
    opt_state: Any
    batch: jax.sharding.NamedSharding
    replicated: jax.sharding.NamedSharding

    @property
    def params(self):
        return partition.merge(self.trainable, self.frozen)


def layout(run: Run, trainable, frozen) -> Layout:
    mesh, mesh_cfg = run.mesh, run.config.mesh
    boxed = models.abstract_params(run.model)
    trainable_sh = sharding.param_shardings(trainable, boxed, mesh, mesh_cfg)
    opt_sh = None
    if run.tx is not None:
        opt_sh = sharding.state_shardings(jax.eval_shape(run.tx.init, trainable), trainable, trainable_sh, mesh)
    return Layout(trainable_sh, sharding.param_shardings(frozen, boxed, mesh, mesh_cfg), opt_sh,
                  sharding.batch_sharding(mesh), sharding.replicated(mesh))


def train_step_fn(run: Run):
    """The un-jitted step(trainable, opt_state, frozen, batch, rng) -> (trainable, opt_state, metrics),
    pure so that it can be jitted (make_train_step) or vmapped over K runs (ptune.training.multi).

    Gradients are taken with respect to `trainable` only, so XLA never computes the frozen
    weights' gradients. With `train.grad_accum` = k the batch is split into k micro-batches
    whose summed-loss gradients are added and divided by the whole batch's count once, so the
    update equals the one-batch update.

    A step whose loss or gradient norm is not finite is not applied: trainable and optimizer
    state come back unchanged, its metrics are zeroed and `nonfinite` is 1 (the host decides,
    by config.train.nonfinite, whether the run stops). A finite step's result is unchanged bitwise.
    """
    accum = run.config.train.grad_accum

    def grads_of(trainable, frozen, batch, rng):
        def loss_sum(t):
            _, metrics = objectives.loss(run.model, partition.merge(t, frozen), batch, run.objective,
                                         run.label_ids, rng, deterministic=False)
            return metrics["loss_sum"], metrics
        (_, metrics), grads = jax.value_and_grad(loss_sum, has_aux=True)(trainable)
        return grads, metrics

    def step(trainable, opt_state, frozen, batch, rng):
        if accum == 1:
            grads, metrics = grads_of(trainable, frozen, batch, rng)
        else:
            # Micro-batch i takes rows i, i+k, ...: rows stay spread over the data-parallel devices.
            micro = jax.tree.map(lambda x: x.reshape((x.shape[0] // accum, accum) + x.shape[1:]).swapaxes(0, 1),
                                 batch)

            def add(total, i):
                mb = jax.tree.map(lambda x: x[i], micro)
                return jax.tree.map(jnp.add, total, grads_of(trainable, frozen, mb, jax.random.fold_in(rng, i))), None
            shapes = jax.eval_shape(grads_of, trainable, frozen, jax.tree.map(lambda x: x[0], micro), rng)
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
            (grads, metrics), _ = jax.lax.scan(add, zeros, jnp.arange(accum))
        grads = jax.tree.map(lambda g: g / jnp.maximum(metrics["count"], 1), grads)
        metrics["grad_norm"] = optax.tree.norm(grads)
        finite = jnp.isfinite(metrics["loss_sum"]) & jnp.isfinite(metrics["grad_norm"])

        def apply(trainable, opt_state):
            updates, opt_state = run.tx.update(grads, opt_state, trainable)
            return optax.apply_updates(trainable, updates), opt_state
        trainable, opt_state = jax.lax.cond(finite, apply, lambda t, o: (t, o), trainable, opt_state)
        metrics = jax.tree.map(lambda m: jnp.where(finite, m, jnp.zeros_like(m)), metrics)
        metrics["nonfinite"] = (~finite).astype(jnp.float32)
        return trainable, opt_state, metrics
    return step


def make_train_step(run: Run, where: Layout | None = None):
    """`train_step_fn` jitted with the layout's shardings; trainable and optimizer state are donated."""
    if where is None:
        return jax.jit(train_step_fn(run), donate_argnums=(0, 1))
    return jax.jit(train_step_fn(run), donate_argnums=(0, 1),
                   in_shardings=(where.trainable, where.opt_state, where.frozen, where.batch, where.replicated),
                   out_shardings=(where.trainable, where.opt_state, where.replicated))


def make_eval_step(run: Run, where: Layout | None = None):
    fn = lambda params, batch: objectives.loss(run.model, params, batch, run.objective, run.label_ids)[1]
    if where is None:
        return jax.jit(fn)
    return jax.jit(fn, in_shardings=(where.params, where.batch), out_shardings=where.replicated)


def evaluate(run: Run, params, split: str, eval_step=None, where: Layout | None = None) -> dict:
    """Mean metrics of `params` on `split` (and its `count`), with a progress bar of its own while it runs."""
    from tqdm import tqdm
    eval_step = eval_step or make_eval_step(run, where)
    sums: dict = {}
    size, rows = run.config.train.eval_batch_size, len(next(iter(run.data[split].values())))
    show = run.config.train.progress and jax.process_index() == 0
    for batch in tqdm(batching.eval_batches(run.data[split], size), desc=f"evaluating {split}", unit="batch",
                      total=-(-rows // size), leave=False, disable=not show, dynamic_ncols=True):
        if where is not None:
            batch = sharding.put_batch(batch, where.batch)
        sums = objectives.accumulate(sums, eval_step(params, batch))
    return objectives.finalize(sharding.to_host(sums))


def dropout_key(seed: int):
    """The key that `fold_in(key, step)` turns into a training step's dropout key."""
    return jax.random.fold_in(jax.random.key(seed), 2)


def init_opt_state(run: Run, where: Layout, trainable):
    return jax.jit(run.tx.init, out_shardings=where.opt_state)(trainable)


def make_step_fn(run: Run, where: Layout, frozen, pending: list):
    """`step_fn((trainable, opt_state), step)` for `train_steps`: the train step on step `step`'s batch
    and dropout key, which depend only on the seed and the step (so resumed runs and the Python
    API's steps equal uninterrupted ones); each step's non-finite flag (on the device) goes to
    `pending` for `check_finite`."""
    tc, seed = run.config.train, run.config.seed
    train_step, keys = make_train_step(run, where), dropout_key(seed)

    def step_fn(state, step):
        batch = sharding.put_batch(batching.batch_at(run.data["train"], step, tc.batch_size, seed), where.batch)
        *state, metrics = train_step(*state, frozen, batch, jax.random.fold_in(keys, step))
        pending.append((step, metrics["nonfinite"]))
        return tuple(state), metrics
    return step_fn
