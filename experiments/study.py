"""The study: fine-tuning vs prompt-tuning on the shipped models and data, measured (issue 7).

Everything, sweeps then report (tables, plots, docs/RESULTS_LOW_BUDGET.md):

    python scripts/study.py --workdir workdirs/study

Expected on this 2-core CPU, measured job by job: about 4 hours when the machine is otherwise
idle (MiniLM jobs of 3 vmapped seeds 2.5-4 minutes each, ~10 for topic and genre with their large
validation sets; SmolLM2 jobs 6-19 minutes; the encoder part ~115 minutes, decoder ~70, data ~20,
generate ~10, cost ~20, multitask ~1). A finished
point is skipped when run again, so an interrupted study continues where it stopped; the records
of the runs behind docs/RESULTS_LOW_BUDGET.md are kept in docs/study-runs/ (copy them to the workdir to
continue from them). One part alone (each is a sweep; `:part` reaches get_config and get_sweep):

    python scripts/sweep.py --config experiments/study.py:encoder --workdir workdirs/study/encoder --vmap

Parts (3 seeds everywhere something trains; the seeds of one method train as one vmapped job,
VMAP_CHUNK below says how many at once):
  encoder   MiniLM-L6 (22.7M, a fresh head; no zero-shot: the shipped encoder has no MLM head),
            9 training methods x {sentiment (3 domains pooled), spam}, full / LoRA / prompt x {topic,
            genre}, 60 steps of batch 8: accuracy, curves, paraphrase fragility, per-seed predictions.
  decoder   SmolLM2-135M (verbalizer), 8 training methods (not BitFit: LLaMA has no biases) +
            manual (zero-shot, every template) on the Amazon sentiment domain, 24 steps of batch 8:
            accuracy, fragility, and Brown-corpus perplexity after training (forgetting; manual =
            the untouched base).
  data      MiniLM, sentiment with K = 16 / 64 / 256 examples per class, full / LoRA / prompt.
  generate  SmolLM2 on ChatterBot Q->A: LoRA and prompt tuning vs zero-shot, answer perplexity.

The budgets are small on purpose (CPU): the study measures the low-budget regime; each method has
one learning rate (below, usual values from its paper or PEFT's examples), not tuned per task.
Expected direction (see docs/RESULTS_LOW_BUDGET.md for the measured numbers and verdicts): LoRA, adapters,
BitFit and IA3 near full fine-tuning; prompt tuning clearly below it at these model sizes.
"""

from ptune.config import base_config, with_method
from ptune.errors import UserError

SEEDS = [0, 1, 2]
# How many of a job's vmapped seeds run at once: all for the small encoder (larger matmuls help a
# CPU), one at a time for the decoder (three full fine-tunings' AdamW states already take ~6 GB).
VMAP_CHUNK = {"encoder": 0, "data": 0, "decoder": 1, "generate": 1}
# One learning rate per method (AdamW, constant); a hybrid gives each part its own group.
METHODS = {
    "full": {"optim.learning_rate": 1e-4},
    "bitfit": {"optim.learning_rate": 3e-3},
    "lora": {"optim.learning_rate": 1e-3},
    "adapter": {"optim.learning_rate": 1e-3},
    "prefix": {"optim.learning_rate": 1e-3},
    "prompt": {"optim.learning_rate": 3e-2},
    "ptuning_v2": {"optim.learning_rate": 1e-2},
    "ia3": {"optim.learning_rate": 3e-3},
    "lora+prompt": {"optim.learning_rate": 1e-3, "optim.groups.prompt.learning_rate": 3e-2},
}
# task -> (task options, max_length, more final evaluations, methods)
ENCODER_TASKS = {
    "sentiment": ({"domain": "all"}, 48, {"eval.splits": "test", "eval.templates": True, "eval.max_examples": 100,
                                          "eval.predictions": True, "train.eval_every": 10}, list(METHODS)),
    "spam": ({}, 64, {"eval.splits": "test"}, list(METHODS)),
    # The 25- and 15-class tasks (large validation sets): fine-tuning, LoRA and prompt tuning only,
    # for CPU time.
    "topic": ({}, 64, {}, ["full", "lora", "prompt"]),
    "genre": ({}, 64, {}, ["full", "lora", "prompt"]),
}
# BitFit trains bias terms and SmolLM2 (LLaMA) has none, so it does not apply to the decoder.
DECODER_METHODS = [m for m in METHODS if m != "bitfit"]
K_SHOTS = [16, 64, 256]
DATA_METHODS = ["full", "lora", "prompt"]
PARTS = ("encoder", "decoder", "data", "generate")


def get_config(part: str = "encoder"):
    if part not in PARTS:
        raise UserError(f"experiments/study.py: unknown part {part!r}; choose one of {PARTS}")
    config = with_method(base_config(), "lora")
    config.train.update(batch_size=8, eval_batch_size=50, log_every=10, progress=False)
    config.checkpoint.every_steps = 0   # the study keeps metrics and predictions, not adapters
    if part in ("encoder", "data"):
        config.model.checkpoint = "minilm"
        config.optim.groups.head = {"learning_rate": 1e-3}   # the fresh head, whatever the method
        config.task.name, config.task.options, config.task.max_length = "sentiment", {"domain": "all"}, 48
        config.train.update(steps=60, eval_every=60)
    else:
        config.model.checkpoint = "smollm2"
        config.train.update(steps=24, eval_every=24)
    if part == "decoder":
        config.task.name, config.task.options, config.task.max_length = "sentiment", {"domain": "amazon"}, 48
        config.train.eval_batch_size = 20   # divides the 100 validation / test sentences
        config.eval.update(splits="test", predictions=True, max_examples=40,
                           lm_task="brown_lm", lm_max_length=128, lm_max_examples=20)
    if part == "generate":
        config.task.name, config.task.max_length = "chatterbot_qa", 64
    return config


def _trained(methods, extra=None):
    return [{"method": m, **METHODS[m], **(extra or {}), "seed": s} for m in methods for s in SEEDS]


def get_sweep(part: str = "encoder"):
    if part == "encoder":
        return [p for task, (options, length, evals, methods) in ENCODER_TASKS.items()
                for p in _trained(methods, {"task.name": task, "task.options": options, "task.max_length": length,
                                            **evals})]
    if part == "decoder":
        # Paraphrase fragility: every template on the whole validation split for zero-shot, on 40
        # sentences of it for seed 0 of each trained method (the forward passes dominate the cost).
        return [{"method": "manual", "eval.templates": True, "eval.max_examples": 0}] + [
            {**p, "eval.templates": p["seed"] == 0} for p in _trained(DECODER_METHODS)]
    if part == "data":
        return [{"method": m, **METHODS[m], "task.options": {"domain": "all", "k_shot": k, "shot_seed": s}, "seed": s}
                for k in K_SHOTS for m in DATA_METHODS for s in SEEDS]
    if part == "generate":
        return [{"method": "manual"}] + _trained(["lora", "prompt"])
    raise UserError(f"experiments/study.py: unknown part {part!r}; choose one of {PARTS}")
