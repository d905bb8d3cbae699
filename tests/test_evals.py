"""The final evaluation suite (config.eval): each measurement equals the same quantity measured
the ordinary way (vmapped points: tests/test_sweep.py), and a suite that cannot run is refused
before the workdir exists."""

import json
import os

import pytest

from ptune.data import synthetic, tasks
from ptune.data.templates import Template
from ptune.training import train

TEMPLATES = (Template("{text}. Overall it was ", ("bad", "good")), Template("Review: {text}\nVerdict: ", ("no", "yes")),
             Template("{text} I rate it ", ("low", "high")))


@pytest.fixture
def paraphrased(monkeypatch):
    """synthetic_sentiment with three paraphrased templates and a test split."""
    def make(n_train: int = 64, n_eval: int = 32, seed: int = 0):
        data = lambda n, s: synthetic.sentiment_sentences(n, s)
        return tasks.Task("paraphrased", "classify", {"train": data(n_train, seed), "validation": data(n_eval, seed + 1),
                                                      "test": data(n_eval, seed + 2)}, templates=TEMPLATES, num_classes=2)
    monkeypatch.setitem(tasks.REGISTRY, "paraphrased", make)


def suite_config(make_config, method="lora", **evals):
    config = make_config(method, steps=4)
    config.task.name = "paraphrased"
    config.checkpoint.every_steps = 0
    config.eval.update(evals)
    return config


@pytest.mark.slow   # default-suite budget; CI runs it
def test_template_accuracies_equal_runs_on_each_template(make_config, paraphrased, tmp_path):
    final = train.train_and_evaluate(suite_config(make_config, "manual", templates=True, predictions=True,
                                                  splits="test"), str(tmp_path / "suite"))
    for i in range(len(TEMPLATES)):
        config = suite_config(make_config, "manual")
        config.task.template_index = i
        alone = train.train_and_evaluate(config, str(tmp_path / f"t{i}"))
        assert final[f"validation_accuracy_t{i}"] == pytest.approx(alone["validation_accuracy"], abs=1e-6)
    # predictions.json holds one class per example, and they score the reported accuracy
    saved = json.load(open(tmp_path / "suite" / "predictions.json"))
    labels = [e["label"] for e in tasks.get("paraphrased").split("validation")]
    assert sorted(saved) == ["test", "validation_t0", "validation_t1", "validation_t2"]
    for i in range(len(TEMPLATES)):
        hits = sum(p == y for p, y in zip(saved[f"validation_t{i}"], labels))
        assert hits / len(labels) == pytest.approx(final[f"validation_accuracy_t{i}"])
    assert len({tuple(saved[f"validation_t{i}"]) for i in range(3)}) > 1   # the templates do differ


def test_max_examples_caps_the_template_evaluation(make_config, paraphrased, tmp_path):
    train.train_and_evaluate(suite_config(make_config, "manual", templates=True, predictions=True, max_examples=5),
                             str(tmp_path))
    assert all(len(v) == 5 for v in json.load(open(tmp_path / "predictions.json")).values())


def test_lm_perplexity_equals_an_lm_run_of_the_same_params(make_config, tmp_path):
    config = make_config("manual")
    config.eval.update(lm_task="synthetic_lm", lm_max_length=32, lm_max_examples=0)
    final = train.train_and_evaluate(config, str(tmp_path / "suite"))
    lm = make_config("manual")
    lm.task.name, lm.task.options, lm.task.max_length = "synthetic_lm", {}, 32
    alone = train.train_and_evaluate(lm, str(tmp_path / "lm"))
    assert final["lm_perplexity"] == pytest.approx(alone["validation_perplexity"], rel=1e-5)
    assert final["lm_perplexity"] > 1


@pytest.mark.parametrize("task, evals, message", [
    ("synthetic_sentiment", {"splits": "dev"}, "config.eval.splits: .*has no split 'dev'"),
    ("synthetic_lm", {"splits": "validation"}, "measure classification"),
    ("synthetic_lm", {"templates": True}, "measure classification"),
    ("synthetic_sentiment", {"predictions": True}, "set one of them"),
    ("synthetic_sentiment", {"lm_task": "synthetic_sentiment"}, "is not a language-modelling task"),
    ("synthetic_sentiment", {"lm_task": "nope"}, "unknown task 'nope'"),
    ("synthetic_sentiment", {"max_examples": -1}, r"config.eval.max_examples=-1 must be an integer >= 0"),
    ("synthetic_sentiment", {"lm_max_length": 1}, r"config.eval.lm_max_length=1 must be an integer >= 2"),
])
def test_bad_suites_are_refused_before_the_workdir_exists(make_config, tmp_path, task, evals, message):
    config = make_config()
    config.task.name, config.task.options = task, {}
    config.eval.update(evals)
    with pytest.raises(ValueError, match=message):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")


def test_lm_suite_on_an_encoder_is_refused(make_config, tmp_path):
    config = make_config(preset="bert-tiny")
    config.eval.lm_task = "synthetic_lm"
    with pytest.raises(ValueError, match="needs a causal model"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")
