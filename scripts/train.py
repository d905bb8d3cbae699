"""Train one config:  python scripts/train.py --config experiments/default.py --workdir /tmp/run
Override any key:     --config.method.rank=16 --config.train.steps=500
Multi-host (one process per host; omit on a single host, or use --distributed where JAX detects
the cluster, e.g. TPU pods or SLURM):
                      --coordinator_address=host0:1234 --num_processes=2 --process_id=0"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from absl import flags

from ptune import cli, sharding
from ptune.training import train

cli.define_config_flag("Experiment config file (get_config).")
flags.DEFINE_string("workdir", None, "Where metrics (and later checkpoints) go.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (else $JAX_COORDINATOR_ADDRESS).")
flags.DEFINE_integer("num_processes", None, "Processes in the job (else $JAX_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", None, "This process's index (else $JAX_PROCESS_ID).")
flags.DEFINE_bool("distributed", False, "Join a multi-process job that JAX detects (TPU pod, SLURM, ...).")
flags.mark_flags_as_required(["config", "workdir"])


def main():
    f = flags.FLAGS
    sharding.initialize_distributed(f.coordinator_address, f.num_processes, f.process_id, f.distributed)
    train.train_and_evaluate(f.config, f.workdir)


if __name__ == "__main__":
    cli.run(main)
