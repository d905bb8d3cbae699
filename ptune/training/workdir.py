"""A run's workdir: proven writable and roomy before training, owned by one run at a time, and
finished once.

Ownership is an advisory `flock` on `<workdir>/.lock.<process>`, held for the run's life. The
kernel drops it when the process ends however it ends (even SIGKILL), so a killed run's lock is
stale at once and the next run takes it over; the file names the holder (pid, host, start) so a
refused run can say who has the workdir. The file is removed on release, so a run that is
refused or fails leaves the workdir as it found it. One lock per process index: the processes
of one multi-host job share a workdir, two jobs do not.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import time
from typing import TYPE_CHECKING

import jax

from ptune import partition
from ptune.data import tasks
from ptune.errors import UserError
from ptune.training import evals

if TYPE_CHECKING:
    from ptune.training.builder import Run
    from ptune.training.compute import Layout

FINAL = "final_metrics.json"   # written last: the mark of a finished run


def prepare(workdir: str, needed_bytes: int = 0):
    """Prove, before any training time is spent, that the workdir's disk has `needed_bytes` free
    (what the run's checkpoints will take: a full disk would otherwise surface hours later,
    inside a save) and that the workdir can be created and written."""
    existing = os.path.abspath(workdir)
    while not os.path.exists(existing):   # checked first, so a refusal creates nothing
        existing = os.path.dirname(existing)
    try:
        free = shutil.disk_usage(existing).free
        if free < needed_bytes:
            raise UserError(f"workdir {workdir!r} has {partition.human_bytes(free)} free but the run's checkpoints "
                            f"need about {partition.human_bytes(needed_bytes)}; free some space, lower "
                            "config.checkpoint.keep, or choose another --workdir")
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_test.{jax.process_index()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise UserError(f"workdir {workdir!r} is not writable ({e.strerror}); choose another --workdir") from None


@contextlib.contextmanager
def owned(workdir: str):
    """Hold `workdir` for this run (see the module docstring); a second run on it raises one
    UserError naming the holder."""
    path = os.path.join(workdir, f".lock.{jax.process_index()}")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 500).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UserError(f"workdir {workdir!r} is in use by the run of {holder}; wait for it to end, stop it, "
                            "or choose another --workdir") from None
        try:   # the holder may have released and removed the file between our open and lock
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()} (started {time.strftime('%Y-%m-%d %H:%M:%S')})"
             .encode())
    try:
        yield
    finally:
        os.remove(path)   # before unlocking: a run waiting on this file then sees it was replaced
        os.close(fd)


def finished(workdir: str) -> dict | None:
    """The final metrics of the run finished in `workdir` (with its `steps`), or None."""
    path = os.path.join(workdir, FINAL)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        final = json.load(f)
    if "steps" not in final:   # written before final metrics recorded the step count
        with open(os.path.join(workdir, "config.json")) as f:
            final["steps"] = json.load(f)["train"]["steps"]
    return final


def contents(workdir: str) -> str:
    """What a run left in `workdir`, for its last line: files, and the checkpoint steps."""
    names = []
    for name in sorted(os.listdir(workdir)):
        if name.startswith("."):
            continue
        if name == "checkpoints":
            steps = sorted(int(n) for n in os.listdir(os.path.join(workdir, name)) if n.isdigit())
            name = f"checkpoints/ (steps {', '.join(map(str, steps))})" if steps else "checkpoints/"
        elif os.path.isdir(os.path.join(workdir, name)):
            name += "/"
        names.append(name)
    return ", ".join(names)


class MetricWriter:
    """Metrics to `metrics.jsonl` and TensorBoard event files in the workdir (process 0 only:
    in a multi-host job every process holds the same replicated metrics)."""

    def __init__(self, workdir: str):
        self.active = jax.process_index() == 0
        if self.active:
            from tensorboardX import SummaryWriter
            self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
            self.tb = SummaryWriter(workdir)

    def write(self, step: int, split: str, metrics: dict):
        if not self.active:
            return
        self.jsonl.write(json.dumps({"step": step, "split": split, **metrics}) + "\n")
        self.jsonl.flush()
        for k, v in metrics.items():
            self.tb.add_scalar(f"{split}/{k}", v, step)

    def close(self):
        if self.active:
            self.jsonl.close()
            self.tb.close()


def start(run: Run, workdir: str) -> tuple[MetricWriter, dict]:
    """Print the summary and write config.json (process 0); returns the metric writer and the
    final metrics known before training. The workdir must have passed `workdir.prepare`."""
    summary = run.summary
    if jax.process_index() == 0:
        print(f"method {run.method.name} on {run.config.model.checkpoint or run.config.model.preset} "
              f"(mesh {dict(run.mesh.shape)}):\n{summary}", flush=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(run.config.to_json_best_effort(indent=2))
        with open(os.path.join(workdir, "task.json"), "w") as f:   # what predictions' class indices mean
            json.dump({"name": run.task.name, "kind": run.task.kind,
                       "label_names": list(tasks.class_names(run.task, run.template)),
                       "template": run.template.text, "verbalizer": list(run.template.verbalizer),
                       "files": run.task.files}, f, indent=2)
    return MetricWriter(workdir), {"method": run.method.name, "steps": run.config.train.steps,
                                   "trainable_params": summary.trainable,
                                   "trainable_percent": 100 * summary.trainable_fraction}


def finish(run: Run, writer: MetricWriter, final: dict, workdir: str, metrics: dict, params,
           where: Layout | None = None) -> dict:
    """Add the final evaluation's `metrics` and the evaluation suite's (config.eval, on the final
    `params`) and write final_metrics.json (the mark of a finished run); print them and what the
    workdir holds."""
    final.update({f"{run.config.train.eval_split}_{k}": v for k, v in metrics.items()})
    final.update(evals.run_suite(run, params, workdir, where))
    writer.close()
    if jax.process_index() == 0:
        with open(os.path.join(workdir, FINAL), "w") as f:
            json.dump(final, f, indent=2)
        print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in final.items()), flush=True)
        print(f"wrote {workdir}: {contents(workdir)}", flush=True)
    return final
