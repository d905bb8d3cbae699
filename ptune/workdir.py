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

import jax

from ptune import partition

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
            raise ValueError(f"workdir {workdir!r} has {partition.human_bytes(free)} free but the run's checkpoints "
                             f"need about {partition.human_bytes(needed_bytes)}; free some space, lower "
                             "config.checkpoint.keep, or choose another --workdir")
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_test.{jax.process_index()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"workdir {workdir!r} is not writable ({e.strerror}); choose another --workdir") from None


@contextlib.contextmanager
def owned(workdir: str):
    """Hold `workdir` for this run (see the module docstring); a second run on it raises one
    ValueError naming the holder."""
    path = os.path.join(workdir, f".lock.{jax.process_index()}")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 500).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ValueError(f"workdir {workdir!r} is in use by the run of {holder}; wait for it to end, stop it, "
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
