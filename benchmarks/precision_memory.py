"""Memory and step time of the precision knobs on a GPT-2-small-shaped model.

    python benchmarks/precision_memory.py [--method lora --batch 8 --length 128 --steps 3 --rounds 3]

Variants (config.model keys): f32; bf16 compute (dtype); bf16 frozen base (frozen_dtype);
both; remat (remat=full, f32). Each run is its own subprocess, so its peak RSS is its own;
the variants run alternately for --rounds rounds and the table shows medians over rounds.
Random weights (preset gpt2), LM loss on the synthetic_lm task, AdamW, through `builder.setup`
and `compute.make_train_step`. Columns: frozen-leaf bytes; RSS after setup; peak RSS while
training steps run (the high-water mark is reset after the first, compiling, step); compile
time; XLA's own temporary-buffer estimate for the step (`memory_analysis`, allocator-independent);
median step time. The machine this ran on may be shared: compare medians, not single runs.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time

from ptune import cli  # noqa: E402

cli.set_xla_flags()   # as the launchers, before JAX starts

VARIANTS = {
    "f32": {},
    "bf16 compute": {"dtype": "bfloat16"},
    "bf16 base": {"frozen_dtype": "bfloat16"},
    "bf16 both": {"dtype": "bfloat16", "frozen_dtype": "bfloat16"},
    "remat": {"remat": "full"},
}


def rss_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in MB."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / 1e6
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(variant: str, args) -> dict:
    import jax

    from ptune import partition
    from ptune.config import base_config, with_method
    from ptune.data import batching
    from ptune.training import builder, compute

    config = with_method(base_config(), args.method)
    config.model.preset = "gpt2"
    config.model.update(VARIANTS[variant])
    config.task.name = "synthetic_lm"
    config.task.options = {"n_train": args.batch * (args.steps + 1), "n_eval": 8}
    config.task.max_length = args.length
    config.train.update(steps=args.steps + 1, batch_size=args.batch, progress=False)
    run = builder.setup(config)
    trainable, frozen = partition.split(run.params, run.labels)
    opt_state = run.tx.init(trainable)
    rss_setup = rss_mb("VmRSS")
    batch = lambda i: batching.batch_at(run.data["train"], i, args.batch, 0)
    t0 = time.perf_counter()
    step = compute.make_train_step(run).lower(trainable, opt_state, frozen, batch(0), jax.random.key(0)).compile()
    compile_s = time.perf_counter() - t0

    def train_step(i):
        nonlocal trainable, opt_state
        t0 = time.perf_counter()
        trainable, opt_state, metrics = jax.block_until_ready(
            step(trainable, opt_state, frozen, batch(i), jax.random.key(i)))
        return time.perf_counter() - t0

    train_step(0)
    with open("/proc/self/clear_refs", "w") as f:   # reset the peak RSS to the current RSS
        f.write("5")
    times = [train_step(i) for i in range(1, args.steps + 1)]
    return {"frozen_mb": run.summary.bytes.get("frozen", 0) / 1e6, "rss_setup_mb": rss_setup,
            "peak_step_mb": rss_mb("VmHWM"), "xla_temp_mb": step.memory_analysis().temp_size_in_bytes / 1e6,
            "compile_s": compile_s, "step_s": statistics.median(times)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="lora")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per run, after the compiling one")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args)))
        return

    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    results: dict[str, list[dict]] = {v: [] for v in variants}
    child = [sys.executable, __file__, f"--method={args.method}", f"--batch={args.batch}",
             f"--length={args.length}", f"--steps={args.steps}"]
    for r in range(args.rounds):
        for v in variants:
            proc = subprocess.run(child + [f"--child={v}"], capture_output=True, text=True, check=True)
            results[v].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1}/{args.rounds} {v}: {results[v][-1]}", file=sys.stderr, flush=True)

    print(f"gpt2 shape, method {args.method}, batch {args.batch} x {args.length}, median of {args.rounds} runs "
          f"(each: median of {args.steps} steps after the compiling one)")
    cols = ["frozen_mb", "rss_setup_mb", "peak_step_mb", "xla_temp_mb", "compile_s", "step_s"]
    print(f"{'variant':<14}" + "".join(f"{c:>14}" for c in cols))
    for v in variants:
        med = {c: statistics.median(x[c] for x in results[v]) for c in cols}
        print(f"{v:<14}" + "".join(f"{med[c]:>14.1f}" if c.endswith("mb") else f"{med[c]:>14.2f}" for c in cols))


if __name__ == "__main__":
    main()
