"""Serve trained tasks from one frozen base:  mixed-task JSONL requests in, predictions out.

    python scripts/serve.py --task sentiment=workdirs/sentiment --task qa=workdirs/qa \
        --requests requests.jsonl --output predictions.jsonl      # '-' (default): stdin / stdout

A request is one line {"task": name, "text": ...}; a prediction is one line {"task", "prediction"}
(and "label" for classification), in the order of the requests. Throughput goes to stderr.
"""

import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from absl import flags

from ptune import cli
from ptune.errors import UserError
from ptune.inference import serve

flags.DEFINE_multi_string("task", None, "name=workdir of a trained run (repeat for every task).")
flags.DEFINE_string("requests", "-", "JSONL file of requests, or '-' for stdin.")
flags.DEFINE_string("output", "-", "JSONL file for predictions, or '-' for stdout.")
flags.DEFINE_string("which", "latest", "Checkpoint of each workdir: latest, best or a step.")
flags.DEFINE_integer("batch_size", 16, "Requests per mixed batch.")
flags.DEFINE_integer("max_new_tokens", 32, "Tokens generated per generation request.")
flags.mark_flags_as_required(["task"])
FLAGS = flags.FLAGS


def read_requests(path: str) -> list[dict]:
    lines = sys.stdin if path == "-" else open(path, encoding="utf-8")
    requests = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                requests.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n} is not JSON ({e.msg}): {line.strip()[:80]!r}") from None
    return requests


def main():
    workdirs = dict(t.split("=", 1) if "=" in t else ("", t) for t in FLAGS.task)
    if "" in workdirs:
        raise UserError(f"--task {workdirs['']!r} must be name=workdir")
    which = int(FLAGS.which) if FLAGS.which.isdigit() else FLAGS.which
    t0 = time.perf_counter()
    server = serve.load(workdirs, which, batch_size=FLAGS.batch_size, max_new_tokens=FLAGS.max_new_tokens)
    requests = read_requests(FLAGS.requests)
    t1 = time.perf_counter()
    predictions = server.predict(requests)
    t2 = time.perf_counter()
    out = sys.stdout if FLAGS.output == "-" else open(FLAGS.output, "w", encoding="utf-8")
    for p in predictions:
        out.write(json.dumps(p) + "\n")
    out.flush()
    print(f"served {len(requests)} requests for {len(workdirs)} tasks in {t2 - t1:.2f} s "
          f"({len(requests) / max(t2 - t1, 1e-9):.1f} examples/s, compilation included; loading took {t1 - t0:.1f} s)",
          file=sys.stderr)


if __name__ == "__main__":
    cli.run(main)
