"""The study at a budget that converges (issue 21): every method trained until validation accuracy
stops improving, its learning rate chosen on validation from a grid, test accuracy reported once.

The recipe, the same for every method (only the learning rate differs):
  AdamW (weight decay 0, b1 0.9, b2 0.999), one learning rate for every trainable leaf (the fresh
  head included, as PEFT's modules_to_save trains it), 50 warmup steps then constant, gradient
  clipping at norm 1, batch 16, max length per task (TASKS), dropout as the model's config.
  Validation accuracy after every epoch; early stopping with patience PATIENCE evaluations, at
  most MAX_EPOCHS epochs; the run ends on its best epoch's parameters, which the test split measures.

Parts (`experiments/study_converged.py:<part>`; the select dir is sentiment's):
  select:sentiment             seed 0 at each rate of the method's GRID; the best validation
                               accuracy wins (ties: the smaller rate)
  seeds:sentiment:<select>     seeds 1 and 2 at the chosen rate (test: mean +- std over seeds 0-2)
  transfer:<task>:<select>     spam, topic, genre (K per class, TASKS), seeds 0-2 at sentiment's rate
  kshot:<K>:<select>           sentiment with K = 16/64/256 per class, LM-BFF's five draws
Each takes an optional last `:<method>`.

    S=workdirs/converged/select-sentiment
    python scripts/sweep.py --config experiments/study_converged.py:select:sentiment --workdir $S --vmap
    python scripts/sweep.py --config experiments/study_converged.py:seeds:sentiment:$S \
        --workdir workdirs/converged/seeds-sentiment --vmap

The points of one method and part train as one vmapped job (ptune.training.multi); a finished point is
skipped when run again, so the study resumes after an interruption (an unfinished job restarts).
The report: `python scripts/report_converged.py --workdir workdirs/converged --collect` (docs/RESULTS.md).
"""

import json
import math
import os

from ptune.config import base_config, with_method
from ptune.errors import UserError

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
# task -> (options, max length, training examples). Lengths cover ~95% of the texts (MiniLM tokens);
# spam, topic and genre train on K examples per class (ptune's few-shot draw, shot seed 13), for CPU
# time, and keep their whole validation and test splits.
TASKS = {
    "sentiment": ({"domain": "all"}, 32, 2400),
    "spam": ({"k_shot": 256}, 64, 512),
    "topic": ({"k_shot": 32}, 64, 800),
    "genre": ({"k_shot": 48}, 64, 720),
}
# The other tasks train at the learning rate each method chose on sentiment (`transfer` parts).
TRANSFER_METHODS = {"spam": ["full", "lora", "prompt", "prefix", "ia3"], "topic": ["full", "lora", "prompt"],
                    "genre": ["full", "lora", "prompt"]}
# Data efficiency on sentiment (`kshot` parts): K examples per class drawn with LM-BFF's five seeds,
# each trained to convergence: an evaluation every epoch but at least every MIN_EVAL_STEPS steps, at
# most MAX_EPOCHS epochs but at least MIN_STEPS steps (a 32-example epoch is 2 steps).
K_SHOTS, SHOT_SEEDS, KSHOT_METHODS = [16, 64, 256], [13, 21, 42, 87, 100], ["full", "lora", "prompt"]
MIN_EVAL_STEPS, MIN_STEPS = 25, 500


def get_config(part: str = "select:sentiment"):
    kind, task, *_ = part.split(":")
    if kind == "kshot":
        k = int(task)
        task, options, length, examples = "sentiment", {"domain": "all", "k_shot": k}, 32, 2 * k
    else:
        options, length, examples = TASKS[task]
    steps_per_epoch = math.ceil(examples / BATCH)
    eval_every = max(steps_per_epoch, MIN_EVAL_STEPS) if kind == "kshot" else steps_per_epoch
    steps = max(MAX_EPOCHS * steps_per_epoch, MIN_STEPS if kind == "kshot" else 0)
    config = with_method(base_config(), "lora")
    config.model.checkpoint = "minilm"
    config.task.update(name=task, max_length=length)
    config.task.options = options
    config.optim.update(warmup_steps=WARMUP, schedule="constant", weight_decay=0.0)
    config.train.update(batch_size=BATCH, eval_batch_size=50, steps=steps, eval_every=eval_every,
                        log_every=max(eval_every // 2, 1), patience=PATIENCE, progress=False)
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
                config = json.load(f)
            # The config's method name, not final_metrics' "method" (the run's label, e.g. "full+head").
            method, lr = config["method"]["name"], config["optim"]["learning_rate"]
            with open(path) as f:
                key = (json.load(f)["validation_accuracy"], -lr)
            if method not in best or key > best[method][0]:
                best[method] = (key, lr)
    return {method: lr for method, (_, lr) in best.items()}


def get_sweep(part: str = "select:sentiment"):
    """select:<task>[:<method>], seeds:<task>:<select dir>[:<method>], transfer:<task>:<select dir>[:<method>]
    or kshot:<K>:<select dir>[:<method>] (select dir: sentiment's, whose chosen rates the others use)."""
    kind, task, *rest = part.split(":")
    if kind == "select":
        return [_point(m, lr, 0) for m in rest or GRID for lr in GRID[m]]
    if kind not in ("seeds", "transfer", "kshot"):
        raise UserError(f"experiments/study_converged.py: unknown part {part!r}; use select:<task>[:<method>], "
                        "seeds:<task>:<select dir>, transfer:<task>:<select dir> or kshot:<K>:<select dir>")
    if not rest:
        raise UserError(f"part {part!r}: name the select workdir, {kind}:{task}:<select workdir>")
    select_dir, *methods = rest
    default = {"seeds": list(GRID), "transfer": TRANSFER_METHODS.get(task), "kshot": KSHOT_METHODS}[kind]
    methods = methods or default
    rates = chosen_rates(select_dir)
    missing = sorted(set(methods) - set(rates))
    if missing:
        raise UserError(f"{select_dir} has no finished selection for {missing}; run the select part first")
    if kind == "seeds":
        return [_point(m, rates[m], s) for m in methods for s in SEEDS[1:]]
    if kind == "transfer":
        return [_point(m, rates[m], s) for m in methods for s in SEEDS]
    return [{**_point(m, rates[m], s), "task.options": {"domain": "all", "k_shot": int(task), "shot_seed": s}}
            for m in methods for s in SHOT_SEEDS]
