"""The final evaluation suite (`config.eval`): what a study measures of a trained model beyond
the validation metrics, run once after training by one run and by K vmapped runs alike.

    eval.splits       more splits evaluated at the end, e.g. "test" -> test_accuracy
    eval.templates    classification: accuracy on the eval split under every one of the task's
                      paraphrased templates -> <split>_accuracy_t0 .. t7 (prompt fragility)
    eval.max_examples cap on the examples of each template evaluation (0 = all)
    eval.lm_task      an LM task whose validation perplexity is measured at the end, e.g. "brown_lm"
                      -> lm_perplexity (forgetting: compare with the untrained base, method manual)
    eval.predictions  write predictions.json: {"<extra split>" | "<eval split>_t<i>": [class per example]}

Everything is checked by `check` before training starts, so a bad suite costs no training time.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from ptune import sharding
from ptune.data import batching, tasks
from ptune.data.templates import Template
from ptune.errors import UserError
from ptune.training import objectives

DEFAULTS = {"splits": "", "templates": False, "max_examples": 0, "lm_task": "", "lm_max_length": 128,
            "lm_max_examples": 0, "predictions": False}


def extra_splits(eval_cfg) -> list[str]:
    return [s for s in eval_cfg.splits.split(",") if s]


def check(run) -> None:
    """Refuse a suite that cannot run on this run's task and model (before any training)."""
    cfg = run.config.eval
    if cfg.predictions and not (cfg.templates or extra_splits(cfg)):
        raise UserError("config.eval.predictions records the predictions of eval.splits and eval.templates; "
                        "set one of them")
    if (cfg.templates or extra_splits(cfg)) and run.task.kind != "classify":
        raise UserError(f"config.eval.splits and eval.templates measure classification; task "
                        f"{run.task.name!r} is {run.task.kind}: leave them empty")
    for split in extra_splits(cfg):
        try:
            run.task.split(split)
        except ValueError as e:
            raise UserError(f"config.eval.splits: {e}") from None
    for i, template in enumerate(run.task.templates if cfg.templates and run.objective == "verbalizer" else ()):
        try:
            template.label_ids(run.tokenizer)
        except ValueError as e:
            raise UserError(f"config.eval.templates: task {run.task.name!r} template {i}: {e}") from None
    if cfg.lm_task:
        if not run.model.config.causal:
            raise UserError(f"config.eval.lm_task={cfg.lm_task!r} needs a causal model; "
                            f"{run.model.config.family} is an encoder")
        if tasks.get(cfg.lm_task).kind != "lm":
            raise UserError(f"config.eval.lm_task={cfg.lm_task!r} is not a language-modelling task")


def run_suite(run, params, workdir: str | None, where=None) -> dict:
    """The suite's metrics for `params` (a run's final parameters); writes predictions.json
    into `workdir` when asked (process 0)."""
    cfg, metrics, predictions = run.config.eval, {}, {}
    if run.task.kind == "classify" and (cfg.templates or extra_splits(cfg)):
        classify = functools.partial(classifier(run, where), params)
        for split in extra_splits(cfg):
            metrics[f"{split}_accuracy"], predictions[split] = classify(run.task.split(split), run.template)
        if cfg.templates:
            split = run.config.train.eval_split
            examples = tasks.head(run.task.split(split), cfg.max_examples or None)
            for i, template in enumerate(run.task.templates):
                metrics[f"{split}_accuracy_t{i}"], predictions[f"{split}_t{i}"] = classify(examples, template)
    if cfg.lm_task:
        metrics["lm_perplexity"] = _perplexity(run, params, where)
    if cfg.predictions and workdir and jax.process_index() == 0:
        with open(os.path.join(workdir, "predictions.json"), "w") as f:
            json.dump(predictions, f)
    return metrics


def classifier(run, where=None):
    """classify(params, examples, template) -> (accuracy, predicted classes); one compiled function
    serves every template (the verbalizer's token ids are an argument) and parameter value."""
    logits_fn = jax.jit(lambda params, batch, label_ids: objectives.class_logits(
        run.model, params, batch, run.objective, label_ids))
    family, max_length = run.model.config.family, run.config.task.max_length

    def classify(params, examples, template):
        verbalizer = run.objective == "verbalizer"
        label_ids = jnp.asarray(template.label_ids(run.tokenizer) if verbalizer else [0])
        arrays = batching.encode(examples, "classify", template, run.tokenizer, family, max_length)
        preds = []
        for batch in batching.eval_batches(arrays, run.config.train.eval_batch_size):
            kept = batch.pop("weight") > 0
            logits = sharding.to_host(logits_fn(params, _place(batch, where), label_ids))
            preds.extend(np.argmax(logits, -1)[kept].tolist())
        return float(np.mean(np.asarray(preds) == arrays["labels"])), preds
    return classify


def _perplexity(run, params, where) -> float:
    cfg = run.config.eval
    examples = tasks.head(tasks.get(cfg.lm_task).split("validation"), cfg.lm_max_examples or None)
    arrays = batching.encode(examples, "lm", Template(), run.tokenizer, run.model.config.family, cfg.lm_max_length)
    step = jax.jit(lambda params, batch: objectives.loss(run.model, params, batch, "lm")[1])
    sums: dict = {}
    for batch in batching.eval_batches(arrays, run.config.train.eval_batch_size):
        sums = objectives.accumulate(sums, step(params, _place(batch, where)))
    return objectives.finalize(sharding.to_host(sums))["perplexity"]


def _place(batch, where):
    return batch if where is None else sharding.put_batch(batch, where.batch)
