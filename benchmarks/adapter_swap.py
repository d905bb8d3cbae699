"""Adapter bank on a GPT-2-small-shaped model: swap/add time of a ~1 MB adapter, and
mixed-task batches against single-task batches.

    python benchmarks/adapter_swap.py [--tasks 4 --capacity 8 --batch 8 --length 64 --repeats 20]

Random weights and random LoRA r=8 adapters on c_attn (294,912 params, 1.18 MB each),
classification by a 2-word verbalizer. Swap = `bank.put` of a known task, add = `put` of a
new one into a free slot (then removed); both wait for the write to finish. Throughput:
examples/s of the bank's mixed batch (every example a different task than its
neighbour) against the same batch run through one task's own LoRA model (median of repeats).
"""

import argparse
import statistics
import time

import flax.linen as nn
import jax
import numpy as np

from ptune import cli  # noqa: E402
from ptune import methods, models, partition  # noqa: E402
from ptune.inference import bank as bank_lib  # noqa: E402

cli.set_xla_flags()   # as the launchers, before JAX starts


def random_lora(cfg, seed: int, rank: int = 8):
    """(model, TaskAdapter) with random LoRA weights of the method's shapes (B nonzero)."""
    method = methods.get("lora", cfg, rank=rank)
    model = models.build(cfg, method.sites)
    shapes = nn.unbox(models.abstract_params(model))
    trainable, _ = partition.split(shapes, method.labels(shapes))
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda s: 0.02 * rng.standard_normal(s.shape).astype(np.float32), trainable)
    return model, bank_lib.TaskAdapter(method.sites, params, label_ids=(100 + seed, 200 + seed))


def median_s(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="gpt2")
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--capacity", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    cfg = models.model_config(args.preset)
    base = models.init(models.build(cfg), jax.random.key(0))
    loras = [random_lora(cfg, seed) for seed in range(args.tasks + 1)]
    adapters = {f"task{i}": a for i, (_, a) in enumerate(loras[:-1])}
    t0 = time.perf_counter()
    bank = bank_lib.Bank(cfg, base, adapters, capacity=args.capacity)
    create_s = time.perf_counter() - t0
    adapter_mb = sum(partition.nbytes(x) for x in jax.tree.leaves(loras[0][1].params)) / 1e6

    swap_s = median_s(lambda: (bank.put("task0", loras[-1][1]), bank.stacked)[1], args.repeats)
    add_times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        bank.put("new", loras[-1][1])
        jax.block_until_ready(bank.stacked)
        add_times.append(time.perf_counter() - t0)
        bank.remove("new")
    add_s = statistics.median(add_times)

    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, (args.batch, args.length)).astype(np.int32)
    mask = np.ones_like(ids)
    names = [f"task{i % args.tasks}" for i in range(args.batch)]
    bank.classify(ids, mask, names)   # compile
    mixed_s = median_s(lambda: bank.classify(ids, mask, names), max(args.repeats // 4, 3))
    model, adapter = loras[1]
    single = jax.jit(lambda params, ids, mask: model.apply({"params": params}, ids, mask, output="last_logits"))
    params = partition.merge(base, adapter.params)
    single(params, ids, mask)
    single_s = median_s(lambda: single(params, ids, mask), max(args.repeats // 4, 3))

    print(f"{args.preset}, {args.tasks} LoRA r=8 tasks in a bank of {args.capacity}, {jax.devices()[0].platform}; "
          f"bank created in {create_s:.1f} s")
    print(f"| measure | value |\n|---|---:|\n| adapter size | {adapter_mb:.2f} MB |\n"
          f"| swap (put a known task) | {1e3 * swap_s:.1f} ms |\n| add (put a new task) | {1e3 * add_s:.1f} ms |\n"
          f"| mixed batch ({args.batch}x{args.length}, {args.tasks} tasks) | {args.batch / mixed_s:.1f} examples/s |\n"
          f"| single-task batch, own model | {args.batch / single_s:.1f} examples/s |")


if __name__ == "__main__":
    main()
