"""Sweeps: an experiment's `get_sweep()` is a list of points, each a dict of config overrides.

    def get_sweep():
        return sweep.product({"method.rank": [2, 8], "seed": [0, 1, 2]})   # 6 points
        # or a plain list: [{"method.rank": 4}, {"method.rank": 8, "optim.learning_rate": 3e-3}]

Keys are dotted config paths; the key `method` sets config.method to that method (or 'a+b'
hybrid) with its options at their defaults, before the point's other keys. Each point trains in `<workdir>/<name>`, where the name is
built from its overrides (`method.rank=8,seed=1`), so it is stable when points are added or
reordered; a point whose workdir holds final_metrics.json is finished and is skipped.
`collect` gathers every finished point's final metrics into results.csv and results.jsonl.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import itertools
import json
import os
import re
from collections.abc import Mapping, Sequence

from ptune import atomic
from ptune import config as config_lib
from ptune.errors import UserError
from ptune.training import multi
from ptune.training import workdir as workdir_lib


@dataclasses.dataclass(frozen=True)
class Point:
    name: str           # the point's workdir name under the sweep's workdir
    overrides: dict     # dotted config key -> value
    config: object      # the experiment config with the overrides applied


def product(axes: Mapping[str, Sequence]) -> list[dict]:
    """Every combination of the values of `axes` ({key: [values]}), the last key varying fastest."""
    keys = list(axes)
    return [dict(zip(keys, values)) for values in itertools.product(*(axes[k] for k in keys))]


def point_name(overrides: Mapping) -> str:
    """A stable, filesystem-safe workdir name: `key=value` pairs joined by ','; 'base' when empty."""
    if not overrides:
        return "base"
    name = ",".join(f"{k}={v}" for k, v in overrides.items())
    name = re.sub(r"[^A-Za-z0-9._=,+-]", "_", name)
    if len(name) > 120:   # keep it a valid file name; the hash keeps it unique
        name = name[:100] + "-" + hashlib.sha1(name.encode()).hexdigest()[:12]
    return name


def points(config, sweep: Sequence[Mapping]) -> list[Point]:
    """The sweep's points with their configs; unknown keys and duplicate points are errors."""
    if isinstance(sweep, Mapping) or not all(isinstance(p, Mapping) for p in sweep):
        raise UserError("get_sweep() must return a list of {config key: value} dicts "
                        "(sweep.product({...}) builds one)")
    out, seen = [], {}
    for i, overrides in enumerate(sweep):
        name = point_name(overrides)
        if name in seen:
            raise UserError(f"sweep points {seen[name]} and {i} are the same ({name}); remove one")
        seen[name] = i
        out.append(Point(name, dict(overrides), config_lib.override(config, overrides, f"sweep point {i} ({name})")))
    return out


def check_hosts(host_index: int, num_hosts: int):
    if num_hosts < 1:
        raise UserError(f"--num_hosts={num_hosts} must be at least 1")
    if not 0 <= host_index < num_hosts:
        raise UserError(f"--host_index={host_index} is out of range for --num_hosts={num_hosts} "
                        f"(0..{num_hosts - 1})")


def for_host(items: Sequence, host_index: int, num_hosts: int) -> list:
    """Host `host_index`'s share of `items` (round robin), so every item runs on exactly one host."""
    check_hosts(host_index, num_hosts)
    return list(items[host_index::num_hosts])


def vmap_groups(points: Sequence[Point]) -> list[list[Point]]:
    """The points grouped so that each group differs only in keys ptune.training.multi can batch (seed,
    learning rates, task data), in first-seen order; each group can train as one vmapped job.
    Different tasks and lengths stay apart: their heads, verbalizers or shapes usually differ."""
    groups: dict = {}
    for p in points:
        fixed = tuple((k, repr(v)) for k, v in sorted(p.overrides.items())
                      if not multi.batchable(k) or k in ("task.name", "task.max_length"))
        groups.setdefault(fixed, []).append(p)
    return list(groups.values())


def finished(workdir: str, point: Point) -> bool:
    return os.path.exists(os.path.join(workdir, point.name, workdir_lib.FINAL))


def collect(workdir: str, points: Sequence[Point]) -> list[dict]:
    """One row per finished point: its name, its overrides, then its final metrics. Writes
    `<workdir>/results.csv` and `results.jsonl` (atomically, as several hosts may collect)."""
    rows = []
    for p in points:
        if finished(workdir, p):
            with open(os.path.join(workdir, p.name, workdir_lib.FINAL)) as f:
                rows.append({"point": p.name, **p.overrides, **json.load(f)})
    atomic.write_text(os.path.join(workdir, "results.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
    table = io.StringIO()
    writer = csv.DictWriter(table, list(dict.fromkeys(k for r in rows for k in r)))
    writer.writeheader()
    writer.writerows(rows)
    atomic.write_text(os.path.join(workdir, "results.csv"), table.getvalue())
    return rows
