"""A LoRA sweep on the tiny random-init GPT-2 (synthetic sentiment): 2 ranks x 3 learning rates.

    python scripts/sweep.py --config experiments/sweep_lora.py --workdir workdirs/sweep_lora
    python scripts/sweep.py --config experiments/sweep_lora.py --workdir workdirs/sweep_lora_vmap --vmap

Expected: 6 workdirs and workdirs/sweep_lora/results.csv (+ .jsonl), one row per point, in about
a minute on an idle 2-core CPU (3.5 min when shared). Validation accuracy (chance 0.5):

    learning rate    1e-3   3e-3   1e-2
    rank 2           0.70   0.77   0.47
    rank 8           0.72   0.88   0.64

With --vmap the 3 learning rates of each rank train as one vmapped job (2 jobs) and give the same
numbers, except lr 1e-2: it is unstable here (loss stays ~0.69), so float rounding differences
(~1e-7 at first) grow to ~1e-2 in the loss by step 70 and its accuracy moves (0.59 at rank 8 here).
Run it again: every point is skipped as finished and the table is rewritten.
"""

from ptune.config import base_config, with_method
from ptune.training import sweep


def get_config():
    config = with_method(base_config(), "lora")
    config.model.preset = "gpt2-tiny"
    config.task.name = "synthetic_sentiment"
    config.train.update(steps=100, eval_every=100, progress=False)
    return config


def get_sweep():
    return sweep.product({"method.rank": [2, 8], "optim.learning_rate": [1e-3, 3e-3, 1e-2]})
