"""Checkpoint size and save/restore time per method, and the frozen-base hash time.

    python benchmarks/checkpoint_size.py [--methods lora full] [--model gpt2] [--checkpoint smollm2]

Random weights for a preset (`--model`), or pretrained ones with `--checkpoint`. The
trainable leaves and optimizer moments are filled with random numbers first, so the
compressed sizes are those of a trained adapter, not of LoRA's all-zero B at init. Prints
one row per method: trainable bytes, adapter artifact bytes (trainable/ + meta/), the
whole resume checkpoint (with optimizer state), save and restore seconds, base-hash seconds.
"""

import argparse
import tempfile
import time

import jax
import numpy as np

from ptune import cli  # noqa: E402
from ptune import partition  # noqa: E402
from ptune.config import base_config, with_method  # noqa: E402
from ptune.training import builder, checkpoint, compute

cli.set_xla_flags()   # as the launchers, before JAX starts


def bench(method: str, model: str, source: str):
    config = with_method(base_config(), method)
    config.model.update(preset=model, checkpoint=source)
    config.task.options = {"n_train": 16, "n_eval": 16}
    config.checkpoint.every_steps = 1
    run = builder.setup(config)
    rng = np.random.default_rng(0)
    trainable, _ = partition.split(run.params, run.labels)
    trainable, opt_state = jax.tree.map(lambda x: (0.02 * rng.standard_normal(x.shape)).astype(x.dtype),
                                        (trainable, run.tx.init(trainable)))
    with tempfile.TemporaryDirectory() as workdir:
        checkpoints = checkpoint.Checkpoints(workdir, run, compute.dropout_key(0))
        t0 = time.perf_counter()
        sizes = checkpoints.save(1, trainable, opt_state)
        save_s = time.perf_counter() - t0
        checkpoints.close()
        t0 = time.perf_counter()
        reopened = checkpoint.Checkpoints(workdir, run, compute.dropout_key(0))   # validates, restores, checks sha256
        restore_s = time.perf_counter() - t0 - reopened.base_hash_seconds
    return sizes, save_s, restore_s, checkpoints.base_hash_seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["lora", "full"])
    parser.add_argument("--model", default="gpt2")
    parser.add_argument("--checkpoint", default="", help="an asset name or HF/GGUF path (overrides --model)")
    args = parser.parse_args()
    human = partition.human_bytes
    print(f"{'method':<8}{'trainable':>12}{'adapter':>12}{'checkpoint':>12}{'save s':>8}{'restore s':>10}"
          f"{'base hash s':>12}")
    for method in args.methods:
        sizes, save_s, restore_s, hash_s = bench(method, args.model, args.checkpoint)
        print(f"{method:<8}{human(sizes['trainable_bytes']):>12}{human(sizes['adapter_bytes']):>12}"
              f"{human(sizes['checkpoint_bytes']):>12}{save_s:>8.2f}{restore_s:>10.2f}{hash_s:>12.2f}", flush=True)


if __name__ == "__main__":
    main()
