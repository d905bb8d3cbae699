"""Training throughput with packed rows against padded rows: LoRA on SmolLM2, a generate or chat task.

    python benchmarks/packing.py [--task chatterbot_qa --lengths 128,256 --batch 8 --steps 6]

The task's train split is encoded at each max_length once padded (an example per row) and once
packed (ptune.data.packing, segment ids in attention_mask); the jitted training step
(ptune.training.compute.make_train_step) then runs on the first `--steps` batches of each after a warm-up
step. Padded and packed batches have one shape, so they share one compile and cost the same per
step: packing gains by the tokens each row carries. Per max_length and layout it prints the rows,
the padding fraction of the split, the median step time and the medians over steps of tokens/s:
real (non-padding) tokens and loss tokens (those predicted, what the loss averages over).

`--task` takes any lm, generate or chat task with its options, e.g. a chat data set (messages
rendered by the tokenizer's chat template) through the `files` task:
    --task files --task_options '{"train": "chats.jsonl", "kind": "chat"}'

Measured on a 2-core AMD EPYC (AVX-512) shared with two training runs, so the step times are
slow; the ratios hold, as both layouts run the same step (chatterbot_qa, 983 examples):
    max_length 128: padded 983 rows, padding 0.791, 12.8 s/step, 16 real / 7 loss tok/s
                    packed 209 rows, padding 0.017, 12.6 s/step, 80 real / 36 loss tok/s (4.7x)
    max_length 256: padded 983 rows, padding 0.889, 28.4 s/step, 7 real / 3 loss tok/s
                    packed 110 rows, padding 0.011, 28.6 s/step, 71 real / 38 loss tok/s (~10x)
A multi-turn chat set (ChatterBot pairs grouped into 1-4 exchanges, 344 conversations), 256:
                    padded 344 rows, padding 0.606, 15.3 s/step, 60 real / 26 loss tok/s
                    packed 138 rows, padding 0.017, 15.9 s/step, 125 real / 47 loss tok/s (2.1x)
"""

import argparse
import json
import statistics
import subprocess
import time

import jax
import jax.numpy as jnp

from ptune import cli  # noqa: E402
from ptune import partition  # noqa: E402
from ptune.config import base_config, with_method, with_task  # noqa: E402
from ptune.data import batching
from ptune.data.packing import padding_fraction
from ptune.training import builder, compute

cli.set_xla_flags()   # as the launchers, before JAX starts


def cpu_model() -> str:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def encode(run, max_length: int, packed: bool):
    return batching.encode(run.task.split("train"), run.task.kind, run.template, run.tokenizer,
                           run.model.config.family, max_length, packed=packed)


def time_steps(run, step, arrays, batch_size: int, steps: int):
    """(median step seconds, median real tokens/s, median loss tokens/s) over `steps` steps after one
    warm-up (the first of a shape compiles)."""
    trainable, frozen = partition.split(run.params, run.labels)
    trainable = jax.tree.map(jnp.copy, trainable)   # the step donates it
    opt_state, rng = run.tx.init(trainable), jax.random.key(0)
    seconds, real, predicted = [], [], []
    for i in range(steps + 1):
        batch = batching.batch_at(arrays, i, batch_size, seed=0)
        start = time.perf_counter()
        trainable, opt_state, _ = jax.block_until_ready(step(trainable, opt_state, frozen, batch, rng))
        if i:
            seconds.append(time.perf_counter() - start)
            real.append((batch["attention_mask"] > 0).sum() / seconds[-1])
            predicted.append(batch["loss_mask"][:, 1:].sum() / seconds[-1])   # position t predicts token t + 1
    return statistics.median(seconds), statistics.median(real), statistics.median(predicted)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="chatterbot_qa", help="an lm, generate or chat task")
    ap.add_argument("--task_options", default="{}", help="the task's options as JSON")
    ap.add_argument("--checkpoint", default="smollm2")
    ap.add_argument("--lengths", default="128,256")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    lengths = [int(n) for n in args.lengths.split(",")]
    config = with_task(with_method(base_config(), "lora"), args.task, **json.loads(args.task_options))
    config.model.checkpoint = args.checkpoint
    config.task.max_length = max(lengths)
    config.train.batch_size = args.batch
    run = builder.setup(config)
    if run.task.kind not in batching.KINDS_THAT_PACK:
        raise SystemExit(f"error: task {args.task!r} is a {run.task.kind} task; packing serves "
                         f"{batching.KINDS_THAT_PACK}")
    print(f"{cpu_model()}, {jax.devices()[0].platform}; {args.checkpoint} + LoRA, task {args.task} ({run.task.kind}, "
          f"{len(run.task.split('train'))} train examples), batch {args.batch}, "
          f"median of {args.steps} steps after warm-up")
    print(f"{'max_length':>10} {'layout':<7}{'rows':>7}{'padding':>9}{'step s':>8}{'real tok/s':>12}{'loss tok/s':>12}")
    step = compute.make_train_step(run)
    for length in lengths:
        for packed in (False, True):
            arrays = encode(run, length, packed)
            step_s, real, predicted = time_steps(run, step, arrays, args.batch, args.steps)
            print(f"{length:>10} {'packed' if packed else 'padded':<7}{len(arrays['input_ids']):>7}"
                  f"{padding_fraction(arrays):>9.3f}{step_s:>8.2f}{real:>12.0f}{predicted:>12.0f}", flush=True)


if __name__ == "__main__":
    main()
