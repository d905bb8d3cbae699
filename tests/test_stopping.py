"""Early stopping (config.train.patience, ptune.training.stopping): when a run stops, and that it ends on
its best evaluation's parameters — alone, resumed from a checkpoint, and vmapped."""

import json
import os

import numpy as np
import pytest

from ptune import partition
from ptune.training import builder, checkpoint, compute, evals, multi, train


def records(workdir, split):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


def suite_params(monkeypatch) -> list:
    """The parameters each final evaluation suite measures, in order."""
    seen, suite = [], evals.run_suite
    monkeypatch.setattr(evals, "run_suite", lambda run, params, *a: seen.append(params) or suite(run, params, *a))
    return seen


def test_a_run_that_stops_improving_stops_after_patience_evaluations(make_config, tmp_path):
    # A learning rate too small to change any float32 loss: no evaluation after the first is better.
    config = make_config("lora", steps=20)
    config.optim.learning_rate = 1e-12
    config.train.update(eval_every=2, patience=2)
    final = train.train_and_evaluate(config, str(tmp_path))
    assert (final["best_step"], final["stopped_step"]) == (2, 6)
    assert [r["step"] for r in records(tmp_path, "validation")] == [2, 4, 6]
    assert records(tmp_path, "train")[-1]["step"] == 6   # no step after the stop
    assert final["validation_loss"] == records(tmp_path, "validation")[0]["loss"]


@pytest.mark.slow   # default-suite budget; CI runs it
def test_a_run_ends_on_its_best_parameters(make_config, tmp_path, monkeypatch):
    """The final evaluation suite (here the test split) measures the best evaluation's parameters,
    not the last step's."""
    config = make_config("lora", steps=24)
    config.optim.learning_rate = 0.3   # large enough that validation loss goes up and down
    config.train.update(eval_every=2, patience=100)
    config.eval.splits = "test"
    seen = suite_params(monkeypatch)
    final = train.train_and_evaluate(config, str(tmp_path))
    evaluated = records(tmp_path, "validation")
    best = min(evaluated, key=lambda r: r["loss"])
    assert final["best_step"] == best["step"] and final["stopped_step"] == 24
    assert final["validation_loss"] == best["loss"]
    assert best["step"] != 24, "the recipe should make the last evaluation not the best; change it"
    run = builder.setup(config)
    again = compute.evaluate(run, seen[0], "validation")
    assert again["loss"] == pytest.approx(best["loss"], rel=1e-6)
    encode = builder.encoder(config, run.task, run.template, run.tokenizer, run.model.config.family)
    run.data["test"] = encode(run.task.split("test"))
    assert final["test_accuracy"] == compute.evaluate(run, seen[0], "test")["accuracy"]


def scripted_evaluations(monkeypatch, losses):
    """compute.evaluate returns the next of `losses` (the training is real; only the verdict is scripted)."""
    it = iter(losses)
    monkeypatch.setattr(compute, "evaluate", lambda *a, **k: {"loss": next(it), "accuracy": 0.5, "count": 32})


@pytest.mark.slow   # default-suite budget; CI runs it
def test_a_resumed_run_keeps_the_best_from_before_its_checkpoint(make_config, tmp_path, monkeypatch):
    """Best at step 6, checkpoint at 12, resumed to 24: the run ends on step 6's parameters, as the
    uninterrupted run does; stopping counts the evaluations from before the resume."""
    losses = [1.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 0.6]   # evaluations at steps 3, 6, ..., 24
    config = make_config("lora", steps=24)
    config.optim.learning_rate = 1e-2
    config.train.update(eval_every=3, patience=4)
    config.checkpoint.update(every_steps=3, keep=1, keep_best=1, best_metric="loss")
    seen = suite_params(monkeypatch)
    scripted_evaluations(monkeypatch, losses)
    whole = train.train_and_evaluate(config, str(tmp_path / "whole"))
    assert (whole["best_step"], whole["stopped_step"]) == (6, 18)   # 9, 12, 15, 18 not better

    config.train.steps = 12
    scripted_evaluations(monkeypatch, losses[:4])
    train.train_and_evaluate(config, str(tmp_path / "resumed"))
    config.train.steps = 24
    scripted_evaluations(monkeypatch, losses[4:])
    resumed = train.train_and_evaluate(config, str(tmp_path / "resumed"))
    assert (resumed["best_step"], resumed["stopped_step"]) == (6, 18)
    at_6 = partition.flatten(checkpoint.load_adapter(str(tmp_path / "whole"), 6)[1])
    for params in (seen[0], seen[-1]):   # the whole run's final suite, the resumed run's
        trained = partition.flatten(partition.split(params, builder.setup(config).labels)[0])
        assert all(np.array_equal(np.asarray(trained[p]), at_6[p]) for p in at_6)


@pytest.mark.slow   # default-suite budget; CI runs it
def test_vmapped_points_stop_one_by_one_and_end_on_their_best(make_config, tmp_path):
    configs = []
    for lr in (1e-12, 0.3):   # the first stops at once, the second trains on
        config = make_config("lora", steps=16)
        config.optim.learning_rate = lr
        config.train.update(eval_every=2, patience=3)
        configs.append(config)
    dirs = [str(tmp_path / "a"), str(tmp_path / "b")]
    finals = multi.train_and_evaluate(configs, dirs)
    assert (finals[0]["best_step"], finals[0]["stopped_step"]) == (2, 8)
    assert [r["step"] for r in records(dirs[0], "validation")] == [2, 4, 6, 8]   # nothing after its stop
    for final, workdir in zip(finals, dirs):
        best = min(records(workdir, "validation"), key=lambda r: r["loss"])
        assert final["best_step"] == best["step"] and final["validation_loss"] == best["loss"]
    alone = train.train_and_evaluate(configs[0], str(tmp_path / "alone"))
    assert (alone["best_step"], alone["stopped_step"]) == (2, 8)


def test_patience_keeps_the_best_checkpoint_and_checks_its_metric(make_config, tmp_path):
    """With checkpoints on (the default) and keep_best=0, early stopping still keeps the best step."""
    config = make_config("lora", steps=8)
    config.optim.learning_rate = 1e-12
    config.train.update(eval_every=2, patience=3)
    config.checkpoint.update(every_steps=2, keep=1, keep_best=0)
    final = train.train_and_evaluate(config, str(tmp_path))
    assert (final["best_step"], final["stopped_step"]) == (2, 8)
    assert sorted(os.listdir(tmp_path / checkpoint.DIRECTORY)) == ["2", "8"]
    assert checkpoint.load_adapter(str(tmp_path), "best")[2]["step"] == 2
    config.checkpoint.best_metric = "perplexity"
    with pytest.raises(ValueError, match="best_metric='perplexity' is not an eval metric"):
        builder.setup(config)
