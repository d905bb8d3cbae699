"""Trainable counts and one-step time of every method on a GPT-2-small-shaped model.

    python benchmarks/method_steps.py [--batch 8 --length 128 --steps 5]

Random weights (no GPT-2 weights ship offline); AdamW; LM objective on random tokens.
Prints one row per method: trainable params, %, bytes, compile time, median step time.
"""

import argparse
import statistics
import time

import jax
import numpy as np

from ptune import cli  # noqa: E402
from ptune import methods, models, optim, partition  # noqa: E402
from ptune.training import objectives  # noqa: E402

cli.set_xla_flags()   # as the launchers, before JAX starts

METHODS = ["full", "bitfit", "lora", "adapter", "prefix", "prompt", "ptuning_v2", "ia3", "manual", "lora+prompt"]


def bench(name, cfg, batch, steps):
    method = methods.get(name, cfg)
    model = models.build(cfg, method.sites)
    params = models.init(model, jax.random.key(0))
    labels = method.labels(params)
    summary = partition.summary(params, labels)
    if not method.trains:
        return summary, float("nan"), float("nan")
    trainable, frozen = partition.split(params, labels)
    tx = optim.build(labels, {g: optim.Group() for g in partition.groups(labels)}, 100)
    opt_state = tx.init(trainable)

    @jax.jit
    def step(trainable, opt_state, frozen, batch):
        loss = lambda t: objectives.loss(model, partition.merge(t, frozen), batch, "lm")[0]
        grads = jax.grad(loss)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return jax.tree.map(lambda p, u: p + u, trainable, updates), opt_state

    t0 = time.perf_counter()
    trainable, opt_state = jax.block_until_ready(step(trainable, opt_state, frozen, batch))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        trainable, opt_state = jax.block_until_ready(step(trainable, opt_state, frozen, batch))
        times.append(time.perf_counter() - t0)
    return summary, compile_s, statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="gpt2")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--methods", default=",".join(METHODS))
    args = ap.parse_args()
    cfg = models.model_config(args.preset)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.length)).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones_like(ids)}
    print(f"{args.preset}, batch {args.batch} x {args.length}, {jax.devices()[0].platform}, "
          f"median of {args.steps} steps after warm-up")
    print(f"{'method':<14}{'trainable':>14}{'%':>10}{'bytes':>12}{'compile s':>11}{'step s':>9}")
    for name in args.methods.split(","):
        s, compile_s, step_s = bench(name, cfg, batch, args.steps)
        print(f"{name:<14}{s.trainable:>14,}{100 * s.trainable_fraction:>10.4f}{s.trainable_bytes:>12,}"
              f"{compile_s:>11.1f}{step_s:>9.2f}", flush=True)


if __name__ == "__main__":
    main()
