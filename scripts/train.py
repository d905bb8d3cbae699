"""Train one config:  python scripts/train.py --config experiments/default.py --workdir /tmp/run
Override any key:     --config.method.rank=16 --config.train.steps=500"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from absl import app, flags
from ml_collections import config_flags

from ptune import train

config_flags.DEFINE_config_file("config", None, "Experiment config file (get_config).", lock_config=True)
flags.DEFINE_string("workdir", None, "Where metrics (and later checkpoints) go.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    try:
        train.train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
    except ValueError as e:   # config errors: one clear line, non-zero exit
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
