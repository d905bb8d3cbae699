"""The study at a budget that converges (issue 21): every method trained until validation accuracy
stops improving, its learning rate chosen on validation from a grid, test accuracy reported once.

The recipe, the same for every method (only the learning rate differs):
  AdamW (weight decay 0, b1 0.9, b2 0.999), one learning rate for every trainable leaf (the fresh
  head included, as PEFT's modules_to_save trains it), 50 warmup steps then constant, gradient
  clipping at norm 1, batch 16, max length per task (below), dropout as the model's config.
  Validation accuracy after every epoch; early stopping with patience PATIENCE epochs, at most
  MAX_EPOCHS; the run ends on its best epoch's parameters, which the test split measures.
  Learning rate: seed 0 at each value of the method's GRID (part `select:<task>`), the best
  validation accuracy wins (ties: the smaller rate); seeds 1 and 2 then train at it
  (`seeds:<task>:<select workdir>`). Test accuracy is reported as mean +- std over seeds 0, 1, 2.

    python scripts/sweep.py --config experiments/study_converged.py:select:sentiment \
        --workdir workdirs/converged/select-sentiment --vmap
    python scripts/sweep.py --config experiments/study_converged.py:seeds:sentiment:workdirs/converged/select-sentiment \
        --workdir workdirs/converged/seeds-sentiment --vmap

The points of one method and task train as one vmapped job (ptune.multi); a finished point is
skipped when run again, so the study resumes after an interruption (an unfinished job restarts).
"""

import json
import math
import os

from ptune.config import base_config, with_method

MAX_EPOCHS, PATIENCE, BATCH, WARMUP = 10, 2, 16, 50
# The learning rates tried per method, around the literature's (PEFT's examples; Hu et al.; Ben
# Zaken et al.; Li & Liang; Lester et al.); a hybrid gives its prompt part ten times LoRA's rate.
GRID = {
    "full": [2e-5, 5e-5, 1e-4],
    "bitfit": [1e-3, 3e-3, 1e-2],
    "lora": [2e-4, 5e-4, 1e-3],
    "adapter": [2e-4, 5e-4, 1e-3],
    "prefix": [1e-3, 3e-3, 1e-2],
    "prompt": [1e-2, 3e-2, 1e-1],
    "ptuning_v2": [3e-3, 1e-2, 3e-2],
    "ia3": [1e-3, 3e-3, 1e-2],
    "lora+prompt": [2e-4, 5e-4, 1e-3],
}
SEEDS = [0, 1, 2]
# task -> (options, max length, training examples): lengths cover ~95% of the texts (MiniLM tokens).
TASKS = {
    "sentiment": ({"domain": "all"}, 32, 2400),
}


def get_config(part: str = "select:sentiment"):
    task = part.split(":")[1]
    options, length, examples = TASKS[task]
    steps_per_epoch = math.ceil(examples / BATCH)
    config = with_method(base_config(), "lora")
    config.model.checkpoint = "minilm"
    config.task.update(name=task, max_length=length)
    config.task.options = options
    config.optim.update(warmup_steps=WARMUP, schedule="constant", weight_decay=0.0)
    config.train.update(batch_size=BATCH, eval_batch_size=50, steps=MAX_EPOCHS * steps_per_epoch,
                        eval_every=steps_per_epoch, log_every=steps_per_epoch // 2, patience=PATIENCE,
                        progress=False)
    config.checkpoint.update(every_steps=0, best_metric="accuracy", best_mode="max")
    config.eval.splits = "test"
    return config


def _point(method: str, lr: float, seed: int) -> dict:
    point = {"method": method, "optim.learning_rate": lr, "seed": seed}
    if "+" in method:   # the hybrid's prompt group at ten times the rate
        point["optim.groups.prompt.learning_rate"] = 10 * lr
    return point


def chosen_rates(select_dir: str) -> dict:
    """{method: the learning rate of the best seed-0 validation accuracy} from a select workdir."""
    best = {}
    for name in sorted(os.listdir(select_dir)):
        path = os.path.join(select_dir, name, "final_metrics.json")
        if os.path.exists(path):
            with open(os.path.join(select_dir, name, "config.json")) as f:
                lr = json.load(f)["optim"]["learning_rate"]
            with open(path) as f:
                final = json.load(f)
            key = (final["validation_accuracy"], -lr)
            if final["method"] not in best or key > best[final["method"]][0]:
                best[final["method"]] = (key, lr)
    return {method: lr for method, (_, lr) in best.items()}


def get_sweep(part: str = "select:sentiment"):
    """select:<task>[:<method>] or seeds:<task>:<select workdir>[:<method>]"""
    kind, task, *rest = part.split(":")
    if kind == "seeds":
        if not rest:
            raise ValueError(f"part {part!r}: name the select workdir, seeds:<task>:<select workdir>")
        select_dir, *rest = rest
        rates = chosen_rates(select_dir)
    methods = rest or list(GRID)
    if kind == "select":
        return [_point(m, lr, 0) for m in methods for lr in GRID[m]]
    if kind == "seeds":
        missing = sorted(set(methods) - set(rates))
        if missing:
            raise ValueError(f"{select_dir} has no finished selection for {missing}; run the select part first")
        return [_point(m, rates[m], s) for m in methods for s in SEEDS[1:]]
    raise ValueError(f"experiments/study_converged.py: unknown part {part!r}; use select:<task>[:<method>] or "
                     "seeds:<task>:<select workdir>[:<method>]")
