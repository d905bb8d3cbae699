"""Run every point of an experiment's sweep (`get_sweep()` in the config file; `file.py:arg` passes
arg to both get_config and get_sweep), one workdir each:

    python scripts/sweep.py --config experiments/sweep_lora.py --workdir workdirs/sweep_lora
    ... --num_hosts=4 --host_index=$I    # this host's share of the points (round robin)
    ... --num_hosts=4 --print_commands   # print the launch command of each of the 4 hosts, run nothing
    ... --vmap                           # points differing only in seed, learning rates or task data
                                         # train as one job, vmapped over one frozen base

A point whose workdir holds final_metrics.json is skipped. At the end <workdir>/results.csv and
results.jsonl hold every finished point (of all hosts): its overrides and final metrics.
`--config.<key>=...` overrides apply to every point.
"""

import os
import shlex
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from absl import flags
from ml_collections import config_flags

from ptune import cli
from ptune import config as config_lib
from ptune.errors import UserError
from ptune.training import multi, sweep, train

cli.define_config_flag("Experiment config file with get_config and get_sweep.", lock_config=False)
flags.DEFINE_string("workdir", None, "Sweep directory: one sub-directory per point, plus the results table.")
flags.DEFINE_integer("host_index", 0, "This host's index among --num_hosts.")
flags.DEFINE_integer("num_hosts", 1, "Hosts (or slices) the points are split across.")
flags.DEFINE_bool("print_commands", False, "Print one launch command per host (for --num_hosts hosts) and exit.")
flags.DEFINE_bool("vmap", False, "Train points that differ only in seed, learning rates or task data "
                                 "together, vmapped over one frozen base (ptune.training.multi).")
flags.DEFINE_integer("vmap_chunk", 0, "With --vmap: points computed at once (0 = all); fewer use less memory.")
flags.mark_flags_as_required(["config", "workdir"])

_HOST_FLAGS = ("--host_index", "--num_hosts", "--print_commands", "--noprint_commands")


def get_sweep():
    """The config file's get_sweep(), given the same ':argument' as its get_config."""
    path, *argument = config_flags.get_config_filename(flags.FLAGS["config"]).split(":", 1)
    module = config_lib.load_module(path)
    if not hasattr(module, "get_sweep"):
        raise UserError(f"{path} defines no get_sweep(); add one returning a list of "
                        "{config key: value} overrides (ptune.training.sweep.product builds one)")
    return module.get_sweep(*argument)


def host_commands(argv, num_hosts):
    """This command line once per host, with its --host_index."""
    args, skip = [], False
    for a in argv[1:]:
        if skip or a.split("=")[0] in _HOST_FLAGS:
            skip = a in _HOST_FLAGS[:2]   # '--host_index 3': the value is the next argument
            continue
        args.append(a)
    return [shlex.join(["python", argv[0], *args, f"--num_hosts={num_hosts}", f"--host_index={i}"])
            for i in range(num_hosts)]


def run_sweep(F):
    sweep.check_hosts(F.host_index, F.num_hosts)
    points = sweep.points(F.config, get_sweep())
    if F.print_commands:
        print("\n".join(host_commands(sys.argv, F.num_hosts)))
        return
    units = sweep.vmap_groups(points) if F.vmap else [[p] for p in points]
    mine = sweep.for_host(units, F.host_index, F.num_hosts)
    print(f"host {F.host_index}/{F.num_hosts}: {sum(map(len, mine))} of {len(points)} points", flush=True)
    for unit in mine:
        todo = [p for p in unit if not sweep.finished(F.workdir, p)]
        for p in unit:
            if p not in todo:
                print(f"skip {p.name}: finished", flush=True)
        if not todo:
            continue
        workdirs = [os.path.join(F.workdir, p.name) for p in todo]
        names = ", ".join(p.name for p in todo)
        print(f"{'vmapped points' if len(todo) > 1 else 'point'} {names}", flush=True)
        try:
            if len(todo) > 1:
                multi.train_and_evaluate([p.config for p in todo], workdirs, F.vmap_chunk or None)
            else:
                train.train_and_evaluate(todo[0].config, workdirs[0])
        except ValueError as e:
            raise UserError(f"{names}: {e}") from None
        sweep.collect(F.workdir, points)   # the table so far, so an interrupted sweep still has one
    rows = sweep.collect(F.workdir, points)
    print(f"{len(rows)} of {len(points)} points finished; table in "
          f"{os.path.join(F.workdir, 'results.csv')} and results.jsonl", flush=True)


def main():
    run_sweep(flags.FLAGS)


if __name__ == "__main__":
    cli.run(main)
