import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from ptune import partition
from ptune.data import batching
from ptune.training import builder, checkpoint, compute, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINING_METHODS = ["full", "bitfit", "head", "lora", "adapter", "prefix", "prompt", "ptuning_v2", "ia3",
                    "lora+prompt"]
FAMILIES = ["gpt2-tiny", "llama-tiny", "bert-tiny"]


# LLaMA has no biases, so bitfit refuses it (tests/methods/test_errors.py).
@pytest.mark.parametrize("method,preset", [(m, p) for m in TRAINING_METHODS for p in FAMILIES
                                           if (m, p) != ("bitfit", "llama-tiny")])
def test_one_step_every_method_every_family(make_config, method, preset):
    config = make_config(method, preset)
    if method == "head":
        config.task.objective = "head"
    run = builder.setup(config)
    trainable, frozen = partition.split(run.params, run.labels)
    opt_state = run.tx.init(trainable)
    batch = batching.batch_at(run.data["train"], 0, 4, 0)
    new, _, metrics = compute.make_train_step(run)(jax.tree.map(np.array, trainable), opt_state, frozen, batch,
                                                  jax.random.key(0))
    assert np.isfinite(float(metrics["loss_sum"])) and float(metrics["count"]) == 4
    changed = [p for p, v in partition.flatten(new).items()
               if not np.array_equal(np.asarray(v), np.asarray(partition.flatten(trainable)[p]))]
    assert changed, "one step changed no trainable parameter"


def test_lm_objective_on_decoders(make_config):
    for preset in ("gpt2-tiny", "llama-tiny"):
        config = make_config("lora", preset)
        config.task.name = "synthetic_lm"
        run = builder.setup(config)
        metrics = compute.evaluate(run, run.params, "validation")
        # A random model is near-uniform over the 260-byte vocabulary.
        assert 150 < metrics["perplexity"] < 400


def results(workdir):
    """metrics.jsonl without its timings, and the final adapter (saved after the last step)."""
    timeless = [{k: v for k, v in json.loads(line).items() if k != "examples_per_s"}
                for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return timeless, partition.flatten(checkpoint.load_adapter(str(workdir))[1])


def test_same_seed_same_numbers_and_training_learns(make_config, tmp_path):
    """Bitwise: every logged number, the final metrics and the final parameters."""
    config = make_config("lora", steps=30)
    config.optim.learning_rate = 3e-3
    a = train.train_and_evaluate(config, str(tmp_path / "a"))
    b = train.train_and_evaluate(config, str(tmp_path / "b"))
    assert a == b
    (records_a, params_a), (records_b, params_b) = results(tmp_path / "a"), results(tmp_path / "b")
    assert records_a == records_b and len(records_a) == 31
    assert params_a.keys() == params_b.keys()
    assert all(np.array_equal(params_a[p], params_b[p]) for p in params_a)
    assert records_a[0]["split"] == "train" and a["train_loss"] < records_a[0]["loss"]
    assert sum(r.get("skipped_steps", 0) for r in records_a) == 0


def poison_step(monkeypatch, poisoned: int):
    """Training batches get a per-example `weight`: ones, NaN in the batch of step index `poisoned`,
    so that step's loss and gradients are NaN."""
    batch_at = batching.batch_at

    def poisoned_batch_at(arrays, step, batch_size, seed):
        batch = batch_at(arrays, step, batch_size, seed)
        batch["weight"] = np.full(batch_size, np.nan if step == poisoned else 1.0, np.float32)
        return batch
    monkeypatch.setattr(batching, "batch_at", poisoned_batch_at)


def nonfinite_config(make_config, mode):
    config = make_config("lora", steps=6)
    config.train.update(log_every=5, nonfinite=mode)   # the bad step 4 is found at the save of step 4
    config.checkpoint.every_steps = 2
    return config


def test_nonfinite_step_stops_naming_it_and_keeps_the_last_good_checkpoint(make_config, tmp_path, monkeypatch):
    poison_step(monkeypatch, 3)
    with pytest.raises(ValueError, match=r"training step 4: the loss or gradients are not finite, so the step was "
                                         r"not applied and the run stopped \(checkpoint step 2 is kept\); lower "
                                         r"config.optim.learning_rate .* config.train.nonfinite='skip'"):
        train.train_and_evaluate(nonfinite_config(make_config, "stop"), str(tmp_path))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]
    adapter = checkpoint.load_adapter(str(tmp_path))[1]
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(adapter))


def test_nonfinite_step_is_skipped_and_counted(make_config, tmp_path, monkeypatch):
    clean = train.train_and_evaluate(nonfinite_config(make_config, "skip"), str(tmp_path / "clean"))
    poison_step(monkeypatch, 3)
    final = train.train_and_evaluate(nonfinite_config(make_config, "skip"), str(tmp_path / "skip"))
    records = [r for r in results(tmp_path / "skip")[0] if r["split"] == "train"]
    assert [(r["step"], r["skipped_steps"]) for r in records] == [(5, 1), (6, 0)]
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) for r in records)
    assert np.isfinite(final["train_loss"]) and final["validation_loss"] != clean["validation_loss"]
    assert all(np.isfinite(x).all() for x in results(tmp_path / "skip")[1].values())


def test_manual_prompt_evaluates_without_training(make_config, tmp_path):
    config = make_config("manual", template="Text: {text} Verdict: ")
    final = train.train_and_evaluate(config, str(tmp_path))
    assert final["trainable_params"] == 0 and 0 <= final["validation_accuracy"] <= 1
    lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert [l["split"] for l in lines] == ["validation"]


def test_custom_method_from_outside_the_package(tmp_path):
    spec = importlib.util.spec_from_file_location("custom_mask", os.path.join(ROOT, "experiments/custom_mask.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.train.update(steps=3, batch_size=4, progress=False, log_every=1)
    config.task.options = {"n_train": 32, "n_eval": 16}
    run = builder.setup(config)
    assert run.summary.count == {"norm": 640, "lora": 2560, "frozen": run.summary.total - 3200}
    final = train.train_and_evaluate(config, str(tmp_path))
    assert final["trainable_params"] == 3200 and np.isfinite(final["train_loss"])


def _launch(workdir, *overrides):
    cmd = [sys.executable, os.path.join(ROOT, "scripts/train.py"), "--config",
           os.path.join(ROOT, "experiments/default.py"), f"--workdir={workdir}", "--config.train.progress=False",
           "--config.train.steps=4", "--config.train.log_every=2", "--config.train.eval_every=2", *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_launcher_writes_metrics(tmp_path):
    proc = _launch(tmp_path, "--config.method.rank=2")
    assert proc.returncode == 0, proc.stderr
    assert "trainable params: 1,024" in proc.stdout
    lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert [(l["step"], l["split"]) for l in lines] == [(2, "train"), (2, "validation"), (4, "train"),
                                                       (4, "validation")]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path))
    assert "validation_accuracy" in json.load(open(tmp_path / "final_metrics.json"))


def test_generation_task_trains_on_outputs(make_config, tmp_path):
    config = make_config("lora", steps=2)
    config.task.name = "chatterbot_qa"
    config.task.options = {"k_shot": 16}
    config.task.max_length = 64
    final = train.train_and_evaluate(config, str(tmp_path))
    assert np.isfinite(final["train_loss"]) and final["validation_perplexity"] > 1


def test_optimizer_group_override(make_config):
    config = make_config("lora", lr_ratio_b=4.0)
    config.optim.groups = {"lora": {"learning_rate": 0.01}}
    run = builder.setup(config)
    assert partition.groups(run.labels) == ["lora", "lora_b"]


@pytest.mark.parametrize("task", ["synthetic_sentiment", "synthetic_lm"])
def test_gradient_accumulation_equals_the_whole_batch(make_config, task):
    """4 micro-batches of 2 give the update of one batch of 8, also when micro-batches hold
    different numbers of loss tokens (LM): gradients are summed, then divided by the whole count."""
    config = make_config("lora+prompt")
    config.task.name = task
    config.optim.update(optimizer="sgd", learning_rate=1.0)   # update = gradient: nothing scaled away
    config.train.batch_size = 8
    run = builder.setup(config)
    trainable, frozen = jax.tree.map(np.asarray, partition.split(run.params, run.labels))
    batch = batching.batch_at(run.data["train"], 0, 8, 0)
    if task == "synthetic_lm":
        assert len({int(m.sum()) for m in batch["loss_mask"].reshape(4, 2, -1)}) > 1
    results = []
    for accum in (1, 4):
        config.train.grad_accum = accum
        step = compute.make_train_step(dataclasses.replace(run, config=config))
        t = jax.tree.map(np.copy, trainable)
        results.append(step(t, run.tx.init(t), frozen, batch, jax.random.key(0)))
    (one, _, m1), (four, _, m4) = results
    assert float(m1["count"]) == float(m4["count"])
    assert float(m4["loss_sum"]) == pytest.approx(float(m1["loss_sum"]), rel=1e-6)
    assert float(m4["grad_norm"]) == pytest.approx(float(m1["grad_norm"]), rel=1e-5)
    largest = lambda xs, ys: max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in
                                 zip(jax.tree.leaves(xs), jax.tree.leaves(ys)))
    assert largest(one, trainable) > 1e-3 and largest(one, four) < 1e-6
