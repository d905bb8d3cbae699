"""K LoRA adapters trained at once (ptune.training.multi, vmapped over one frozen base) vs K sequential
runs vs one run, on a GPT-2-small-shaped model with random weights.

    python benchmarks/k_adapters.py [--k 8 --batch 8 --length 128 --steps 5 --chunks 8]

Each variant runs in its own subprocess, so its peak RSS (ru_maxrss) is its own. The K points
share the seed (so the random base is identical and shared) and differ in learning rate.
Step times are medians over `--steps` steps after `--warmup` steps; examples/s counts every
point's examples. `--chunks 8,2`: also vmapped variants computing only that many points at once.
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import jax
import numpy as np

from ptune import cli  # noqa: E402
from ptune import partition  # noqa: E402
from ptune.config import base_config, with_method  # noqa: E402
from ptune.data import batching
from ptune.training import builder, compute, multi

cli.set_xla_flags()   # as the launchers, before JAX starts

def config(args, learning_rate):
    c = with_method(base_config(), "lora", rank=8)
    c.model.preset = args.preset
    c.task.name, c.task.max_length = "synthetic_lm", args.length
    c.task.options = {"n_train": 256, "n_eval": 8}
    c.optim.learning_rate = learning_rate
    c.train.update(steps=args.warmup + args.steps, batch_size=args.batch)
    return c


def timed(args, step, state, batch_at):
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        state = jax.block_until_ready(step(state, batch_at(i)))
        times.append(time.perf_counter() - t0)
    return times[args.warmup:]


def single(args, learning_rate):
    run = builder.setup(config(args, learning_rate))
    trainable, frozen = partition.split(run.params, run.labels)
    train_step, rng = compute.make_train_step(run), jax.random.key(0)
    step = lambda state, batch: train_step(*state, frozen, batch, rng)[:2]
    batch_at = lambda i: batching.batch_at(run.data["train"], i, args.batch, 0)
    return timed(args, step, (trainable, run.tx.init(trainable)), batch_at)


def vmapped(args, chunk):
    configs = [config(args, 1e-4 * 2 ** i) for i in range(args.k)]
    m = multi.setup(configs)
    train_step, rngs = multi.make_train_step(m, chunk), jax.random.split(jax.random.key(0), args.k)
    step = lambda state, batch: train_step(*state, m.frozen, batch, rngs)[:2]

    def batch_at(i):
        batch = batching.batch_at(m.runs[0].data["train"], i, args.batch, 0)
        return {k: np.stack([v] * args.k) for k, v in batch.items()}
    return timed(args, step, (m.trainable, m.opt_state), batch_at)


def child(args):
    t0 = time.perf_counter()
    if args.variant == "one":
        times, points = single(args, 1e-3), 1
    elif args.variant == "sequential":
        times = [t for i in range(args.k) for t in single(args, 1e-4 * 2 ** i)]
        points = 1   # one point per step; the K runs follow each other
    else:
        times, points = vmapped(args, int(args.variant.split("=")[1])), args.k
    step_s = statistics.median(times)
    print(json.dumps({"variant": args.variant, "step_s": step_s, "examples_per_s": points * args.batch / step_s,
                      "wall_s": time.perf_counter() - t0,
                      "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="gpt2")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--chunks", default="8", help="points computed at once in the vmapped variants")
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        return child(args)
    variants = ["one"] + [f"vmapped,chunk={c}" for c in args.chunks.split(",")] + ["sequential"]
    print(f"K={args.k} LoRA r=8 on {args.preset} (random weights), batch {args.batch} x {args.length}, "
          f"{jax.devices()[0].platform}, median of {args.steps} steps after {args.warmup} warm-up")
    print(f"{'variant':<20}{'step s':>9}{'examples/s':>12}{'peak RSS GiB':>14}{'wall s':>9}")
    for variant in variants:
        cmd = [sys.executable, __file__, f"--variant={variant}"] + [
            f"--{k}={getattr(args, k)}" for k in ("preset", "k", "batch", "length", "steps", "warmup")]
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        print(f"{variant:<20}{r['step_s']:>9.2f}{r['examples_per_s']:>12.2f}{r['peak_rss_gib']:>14.2f}"
              f"{r['wall_s']:>9.0f}", flush=True)


if __name__ == "__main__":
    main()
