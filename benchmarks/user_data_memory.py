"""Peak memory of training on a large user data set against a small one (issue 19).

Writes a JSONL language-modelling file of each size (random words), then runs the launcher on it
(`experiments/your_data.py:lm` on a tiny random model, so the data's cost is what shows) for a few
steps, twice: the first run converts the file to Arrow and encodes it, the second finds both cached.
Each run is a child process, sampled every 50 ms from /proc: peak VmRSS (all resident memory,
including pages of the memory-mapped Arrow and encoding files the kernel can drop at will) and peak
RssAnon (the process's own heap: what holding the data as Python objects would grow).

    python benchmarks/user_data_memory.py --sizes 10MB,1GB
"""

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
UNITS = {"KB": 1e3, "MB": 1e6, "GB": 1e9}


def size_of(text: str) -> int:
    return int(float(text[:-2]) * UNITS[text[-2:].upper()])


def write_jsonl(path: pathlib.Path, size: int, seed: int = 0):
    """Records {"text": ~1,000 characters of random words} until the file holds `size` bytes."""
    rng = np.random.default_rng(seed)
    words = np.asarray([f"w{i}" for i in range(5000)])
    written = 0
    with open(path, "w") as f:
        while written < size:
            block = "".join(json.dumps({"text": " ".join(rng.choice(words, 200))}) + "\n" for _ in range(1000))
            f.write(block)
            written += len(block)


def sample(pid: int, peaks: dict, done: threading.Event):
    while not done.is_set():
        try:
            status = pathlib.Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return
        for line in status.splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                peaks[key] = max(peaks.get(key, 0), int(value.split()[0]) * 1024)
        time.sleep(0.05)


def train(data: pathlib.Path, validation: pathlib.Path, workdir: pathlib.Path, env: dict, steps: int) -> dict:
    command = [sys.executable, str(ROOT / "scripts/train.py"), "--config", str(ROOT / "experiments/your_data.py:lm"),
               "--workdir", str(workdir), "--config.model.checkpoint=", "--config.model.preset=gpt2-tiny",
               f"--config.task.options.train={data}", f"--config.task.options.validation={validation}",
               "--config.task.max_length=128", f"--config.train.steps={steps}", f"--config.train.eval_every={steps}",
               "--config.checkpoint.every_steps=0", "--config.train.progress=False"]
    start = time.perf_counter()
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks, done = {}, threading.Event()
    watcher = threading.Thread(target=sample, args=(child.pid, peaks, done))
    watcher.start()
    output = child.communicate()[0]
    done.set()
    watcher.join()
    if child.returncode:
        raise SystemExit(f"training on {data} failed:\n{output}")
    return {**peaks, "seconds": time.perf_counter() - start}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10MB,1GB")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dir", default=None, help="scratch directory (default: a temporary one)")
    args = parser.parse_args()
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
               platform.processor())
    print(f"CPU: {cpu}, {os.cpu_count()} cores; {args.steps} steps of batch 8 x 128, gpt2-tiny, byte tokenizer")
    print(f"{'file':>8} {'records':>9} {'run':>6} {'seconds':>8} {'peak RSS MB':>12} {'peak anon MB':>13}")
    with tempfile.TemporaryDirectory(dir=args.dir) as scratch:
        scratch = pathlib.Path(scratch)
        validation = scratch / "validation.jsonl"
        write_jsonl(validation, 200_000, seed=1)
        for size in args.sizes.split(","):
            data = scratch / f"train-{size}.jsonl"
            write_jsonl(data, size_of(size))
            records = sum(1 for _ in open(data))
            env = {**os.environ, "HF_DATASETS_CACHE": str(scratch / f"cache-{size}")}   # cold for each size
            for run in ("first", "cached"):
                r = train(data, validation, scratch / f"run-{size}-{run}", env, args.steps)
                print(f"{size:>8} {records:>9,} {run:>6} {r['seconds']:>8.1f} {r['VmRSS'] / 1e6:>12,.0f} "
                      f"{r['RssAnon'] / 1e6:>13,.0f}", flush=True)


if __name__ == "__main__":
    main()
