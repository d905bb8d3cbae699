"""The Python API (ptune/api.py, docs/API.md): its steps are the launcher's, its metrics are the
launcher's means with their counts, it loads what scripts/train.py trains, and bad input to it and to
the library functions a notebook calls fails in one line naming the culprit and the fix (the launcher's
config mistakes through `ptune.setup` are tests/test_catalogue.py's test_bad_input_through_the_python_api)."""

import contextlib
import functools
import io
import itertools
import json
import os
import re
import subprocess
import sys
from typing import Callable, NamedTuple

import jax
import numpy as np
import pytest
from test_train import poison_step

import ptune
from ptune import methods, models, partition
from ptune.data import batching, files, tasks
from ptune.data.tokenizers import ByteTokenizer
from ptune.inference import generate
from ptune.training import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# experiments/default.py made tiny: 6 steps of gpt2-tiny on 64 synthetic sentences, logged every 3 steps
# and evaluated and saved at steps 3 and 6.
TINY = {"train.steps": 6, "train.batch_size": 4, "train.eval_batch_size": 16, "train.log_every": 3,
        "train.eval_every": 3, "train.progress": False, "task.max_length": 32,
        "task.options": {"n_train": 64, "n_eval": 32}, "checkpoint.every_steps": 3}


def tiny(**overrides):
    return ptune.load_config("experiments/default.py", {**TINY, **overrides})


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """The launcher's run of tiny(): (workdir, metrics.jsonl records)."""
    workdir = tmp_path_factory.mktemp("launched")
    train.train_and_evaluate(tiny(), str(workdir))
    return str(workdir), [json.loads(line) for line in open(workdir / "metrics.jsonl")]


@pytest.fixture(scope="module")
def tuner():
    """A fresh tiny() tuner (the bad-input rows do not change it)."""
    return ptune.setup(tiny())


def checkpointed(workdir, step):
    from ptune.training import checkpoint
    return partition.flatten(checkpoint.load_adapter(workdir, step)[1])


def assert_equal_trees(flat, tree):
    tree = partition.flatten(tree)
    assert flat.keys() == tree.keys()
    for path in flat:
        assert np.array_equal(flat[path], np.asarray(tree[path])), path


def test_steps_metrics_and_evaluation_equal_the_launchers(launched):
    workdir, records = launched
    logged = {(r["step"], r["split"]): r for r in records}
    tuner = ptune.setup(tiny())
    for done in (3, 6):
        metrics = tuner.train_steps(3)
        assert tuner.step == done
        assert_equal_trees(checkpointed(workdir, done), tuner.trainable)   # bitwise
        launcher = logged[(done, "train")]
        assert (metrics["loss"], metrics["grad_norm"], metrics["skipped_steps"]) == \
            (launcher["loss"], launcher["grad_norm"], launcher["skipped_steps"])
        assert metrics["steps"] == 3 and metrics["count"] == 3 * 4   # examples: 3 steps of batch 4
        scores = tuner.evaluate()
        assert scores == {**{k: logged[(done, "validation")][k] for k in ("loss", "accuracy")}, "count": 32}


def test_predictions_are_what_evaluation_scores(tuner):
    examples = tuner.task.split("test")
    predicted = tuner.predict([e["text"] for e in examples])
    assert set(predicted) <= {"bad", "good"}   # the verbalizer's words: the task has no label names
    accuracy = np.mean([["bad", "good"].index(p) == e["label"] for p, e in zip(predicted, examples)])
    assert accuracy == pytest.approx(tuner.evaluate("test")["accuracy"])
    assert tuner.predict([]) == [] and tuner.predict(iter(["good"])) in (["bad"], ["good"])


def test_load_adapter_serves_a_launcher_run(launched):
    workdir, records = launched
    loaded = ptune.load_adapter(workdir)
    assert loaded.step == 6 and "step=6" in repr(loaded)
    assert_equal_trees(checkpointed(workdir, 6), loaded.trainable)
    final = json.load(open(os.path.join(workdir, "final_metrics.json")))
    scores = loaded.evaluate()
    assert (scores["loss"], scores["accuracy"]) == (final["validation_loss"], final["validation_accuracy"])
    assert ptune.load_adapter(workdir, 3).step == 3
    text = loaded.generate("the movie was", max_new_tokens=4)
    assert isinstance(text, str) and loaded.generate(["a", "b"], max_new_tokens=4)[0] == loaded.generate(
        "a", max_new_tokens=4)


def test_a_generation_task_generates_inside_its_template():
    tasks.register("api_qa", lambda: files.from_records(
        "generate", [{"input": f"question {i}", "output": f"answer {i}"} for i in range(20)]))
    tuner = ptune.setup(tiny(**{"task.name": "api_qa", "task.options": {}, "task.template": "Q: {text}\nA:"}))
    tok, prompt = tuner.tokenizer, "question 3"
    ids = tok.prefix_ids + tok.encode("Q: ") + tok.encode(prompt) + tok.encode("\nA:")
    row = generate.generate(tuner.model, tuner.params, [ids], 6, eos_id=tok.eos_id, pad_id=tok.pad_id)[0].tolist()
    expected = tok.decode(row[:row.index(tok.eos_id)] if tok.eos_id in row else row)
    assert tuner.predict([prompt]) == [tuner.generate(prompt, max_new_tokens=32)]
    assert tuner.generate(prompt, max_new_tokens=6) == expected
    scores = tuner.evaluate()
    assert set(scores) == {"loss", "perplexity", "count"} and scores["count"] > 0   # predicted tokens


def test_a_nonfinite_step_stops_at_it_or_is_skipped(monkeypatch):
    poison_step(monkeypatch, 3)
    stopping = ptune.setup(tiny())
    with pytest.raises(ValueError, match=r"^training step 4: the loss or gradients are not finite, so the step was "
                                         r"not applied .*config.train.nonfinite='skip'"):
        stopping.train_steps(5)
    assert stopping.step == 3 and all(np.isfinite(x).all() for x in jax.tree.leaves(stopping.trainable))
    skipping = ptune.setup(tiny(**{"train.nonfinite": "skip"}))
    metrics = skipping.train_steps(5)
    assert metrics["skipped_steps"] == 1 and metrics["count"] == 4 * 4 and np.isfinite(metrics["loss"])


def test_tokenizer_special_ids_are_attributes():
    gpt2, bert = ByteTokenizer(), ByteTokenizer(family="bert")
    assert (gpt2.prefix_ids, gpt2.suffix_ids) == ([gpt2.bos_id], [])
    assert (bert.prefix_ids, bert.suffix_ids) == ([bert.cls_id], [bert.eos_id])
    template = tasks.get("synthetic_sentiment").template
    row = batching.encode([{"text": "a", "label": 0}], "classify", template, gpt2, "bert", 32)["input_ids"][0]
    assert row[0] == bert.cls_id   # the byte tokenizer takes the model's family


def test_the_public_names_are_documented_and_lazy():
    assert sorted(ptune.__all__) == ["Tuner", "load_adapter", "load_config", "setup"]
    for name in ptune.__all__:
        assert getattr(ptune, name).__doc__
    for name in ("train_steps", "evaluate", "predict", "generate", "params", "trainable"):
        assert getattr(ptune.Tuner, name).__doc__
    code = "import sys, ptune; from ptune import cli; assert 'ptune.api' not in sys.modules; ptune.setup"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})


# ---------------------------------------------------------------------------------------- bad input

GPT2 = models.model_config("gpt2-tiny")


@functools.cache
def params_and_labels():
    method = methods.get("lora", GPT2)
    params = models.init(models.build(GPT2, method.sites), jax.random.key(0))
    return params, method.labels(params)


class Row(NamedTuple):
    name: str
    call: Callable   # (tuner, launched workdir, tmp_path) -> the call that must fail
    culprit: str     # regex: what is at fault
    fix: str         # regex: what to do about it


ROWS = [
    # the API's own arguments
    Row("config file that does not exist", lambda t, w, p: ptune.load_config("experiments/nope.py"),
        r"config file 'experiments/nope.py' does not exist", r"give the path of a Python file"),
    Row("overrides as load_config's spec", lambda t, w, p: ptune.load_config({"train.steps": 3}),
        r"load_config: spec=\{'train.steps': 3\}", r"must be a config file path such as 'experiments/default.py'"),
    Row("overrides that are not a dict", lambda t, w, p: ptune.load_config("experiments/default.py", ["steps=3"]),
        r"load_config: overrides=\['steps=3'\]", r"must be a dict of dotted keys such as \{'train.steps': 20\}"),
    Row("override of a key that does not exist", lambda t, w, p: ptune.load_config(None, {"train.stesp": 3}),
        r"load_config: config key 'train.stesp' does not exist", r"valid keys under config.train: \[.*'steps'"),
    Row("override out of range", lambda t, w, p: ptune.load_config(None, {"train.batch_size": 0}),
        r"config.train.batch_size=0", r"must be an integer >= 1"),
    Row("setup of a dict", lambda t, w, p: ptune.setup({"train": {"steps": 3}}),
        r"setup: config is a dict, not an ml_collections ConfigDict", r"ptune.load_config\(spec"),
    Row("zero steps", lambda t, w, p: t.train_steps(0), r"train_steps: n=0", r"must be an integer >= 1"),
    Row("negative steps", lambda t, w, p: t.train_steps(-1), r"train_steps: n=-1", r"must be an integer >= 1"),
    Row("fractional steps", lambda t, w, p: t.train_steps(2.5), r"train_steps: n=2.5", r"must be an integer >= 1"),
    Row("steps of a loaded adapter", lambda t, w, p: ptune.load_adapter(w).train_steps(1),
        r"a tuner from ptune.load_adapter has no optimizer state", r"rerun scripts/train.py on it"),
    Row("steps of a method that trains nothing", lambda t, w, p: ptune.setup(tiny(method="manual")).train_steps(1),
        r"train_steps: method 'manual' trains nothing", r"choose a method that trains"),
    Row("a string to predict", lambda t, w, p: t.predict("a good film"),
        r"predict: texts must be a list of strings, got str", r"wrap one text as \[text\]"),
    Row("a text that is not a string", lambda t, w, p: t.predict(["fine", 3]),
        r"predict: texts\[1\] is 3, not a string", r"give every one as text"),
    Row("no new tokens", lambda t, w, p: t.generate("a", max_new_tokens=0),
        r"generate: max_new_tokens=0", r"must be an integer > 0"),
    Row("top_p out of range", lambda t, w, p: t.generate("a", temperature=1.0, top_p=0),
        r"generate: top_p=0", r"must be a number in \(0, 1\]"),
    Row("a prompt longer than the context", lambda t, w, p: t.generate("a" * 200),
        r"generate: prompt 201 \+ new 32 \+ prompt/prefix 0 tokens exceed the model's context of 128",
        r"shorten the prompt or max_new_tokens"),
    Row("a split the task lacks", lambda t, w, p: t.evaluate("dev"),
        r"task 'synthetic_sentiment' has no split 'dev'", r"splits: \['test', 'train', 'validation'\]"),
    Row("a workdir without checkpoints", lambda t, w, p: ptune.load_adapter(str(p)),
        r"has no checkpoints \(no checkpoints/ directory\)", r"train there first"),
    Row("a checkpoint that is not there", lambda t, w, p: ptune.load_adapter(w, "bestt"),
        r"which='bestt'", r"choose 'latest', 'best' or one of the saved steps \[3, 6\]"),
    # the library functions a notebook calls
    Row("method options not a number", lambda t, w, p: methods.get("lora", GPT2, alpha="16"),
        r"method lora: alpha='16'", r"must be a number > 0"),
    Row("lora rank 0", lambda t, w, p: methods.get("lora", GPT2, rank=0),
        r"method lora: rank=0", r"must be a positive integer"),
    Row("target regex that does not compile", lambda t, w, p: methods.get("lora", GPT2, targets="c_attn("),
        r"targets 'c_attn\(' is not a valid regex", r"give a list of module names such as \['c_attn'\]"),
    Row("targets that are not names", lambda t, w, p: methods.get("ia3", GPT2, targets=3),
        r"method ia3: targets=3", r"must be a regex string or a list of module names"),
    Row("method options of a part not a dict", lambda t, w, p: methods.get("lora+prompt", GPT2, lora=4),
        r"method 'lora\+prompt': the options of part 'lora' are 4", r"give a dict such as lora=\{"),
    Row("a model name for a model config", lambda t, w, p: methods.get("lora", "gpt2"),
        r"model_config is a str, not a ModelConfig", r"pass ptune.models.model_config\('gpt2'\)"),
    Row("a rule regex that does not compile", lambda t, w, p: partition.label(params_and_labels()[0], [("(", "x")]),
        r"rule #0 regex '\(' does not compile", r"fix the pattern"),
    Row("rules as a string", lambda t, w, p: partition.label(params_and_labels()[0], "lora"),
        r"rules 'lora'", r"must be a list of \(regex, label\) pairs"),
    Row("labels of other parameters", lambda t, w, p: partition.split(params_and_labels()[0], {"head": "frozen"}),
        r"split: the labels are not a label tree of these parameters \('.*' has no label\)",
        r"method.labels\(params\)"),
    Row("no records", lambda t, w, p: files.from_records("classify", []),
        r"from_records: train is an empty list", r"give it records"),
    Row("records that are strings", lambda t, w, p: files.from_records("lm", ["a text"]),
        r"from_records: train\[0\] is 'a text', not a dict", r"give records such as \{'text'"),
    Row("a column of mixed types", lambda t, w, p: files.from_records(
        "classify", [{"text": "a", "label": 1}, {"text": "b", "label": "spam"}]),
        r"from_records: train\[1\] has label='spam', a str, but train\[0\] has a number",
        r"give column 'label' values of one type"),
    Row("a record without text", lambda t, w, p: files.from_records(
        "classify", [{"text": "a", "label": "x"}, {"text": None, "label": "y"}] * 3),
        r"train records record 1 has no 'text'", r"fix those records"),
    Row("token ids outside the vocabulary", lambda t, w, p: generate.generate(
        t.model, t.params, [[1000]], 2, eos_id=0, pad_id=0), r"generate: prompt 0 is \[1000\]",
        r"each prompt must be a list of token ids in \[0, 260\)"),
    Row("text instead of token ids", lambda t, w, p: generate.generate(
        t.model, t.params, ["hello"], 2, eos_id=0, pad_id=0), r"generate: prompt 0 is 'hello'",
        r"\(tokenizer.encode\(text\)\)"),
    Row("an encoding kind that does not exist", lambda t, w, p: batching.encode(
        [{"text": "a"}], "lmm", t.template, t.tokenizer, "gpt2", 8), r"encode: kind 'lmm'",
        r"is not one of \['chat', 'classify', 'generate', 'lm'\]"),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_bad_input(row, tuner, launched, tmp_path):
    with pytest.raises(ValueError) as error:
        row.call(tuner, launched[0], tmp_path)
    message = str(error.value)
    assert "\n" not in message
    assert re.search(row.culprit, message), message
    assert re.search(row.fix, message), message


def test_the_api_table_is_the_issues():
    assert len(ROWS) >= 30 and len({r.name for r in ROWS}) == len(ROWS)


def walk_through() -> str:
    """docs/API.md's Python block."""
    blocks = re.findall(r"```python\n(.*?)```", open(os.path.join(ROOT, "docs/API.md")).read(), re.S)
    assert len(blocks) == 1 and len(blocks[0].splitlines()) < 30
    return blocks[0]


def assert_shows(source: str, printed: str):
    """The comment lines right below each print() of `source` are lines of `printed`, in order
    (whitespace runs are one space; `...` stands for any text)."""
    squash = lambda line: " ".join(line.split())
    out, lines, position = [squash(line) for line in printed.splitlines()], source.splitlines(), 0
    for i in (i for i, line in enumerate(lines) if line.startswith("print(")):
        shown = [squash(line[2:]) for line in itertools.takewhile(lambda l: l.startswith("# "), lines[i + 1:])]
        patterns = [re.compile(".*".join(re.escape(part) for part in line.split("..."))) for line in shown]
        found = [k for k in range(position, len(out) - len(shown) + 1)
                 if all(p.fullmatch(out[k + j]) for j, p in enumerate(patterns))]
        assert found, f"{lines[i]} printed no\n" + "\n".join(shown) + f"\nin\n{printed}"
        position = found[0] + len(shown)


@pytest.mark.slow   # SmolLM2: ~2 min on a 2-core CPU
def test_the_walk_through_runs_as_written(monkeypatch):
    monkeypatch.chdir(ROOT)
    source, namespace, printed = walk_through(), {}, io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(source, "docs/API.md", "exec"), namespace)
    assert_shows(source, printed.getvalue())
    metrics, scores = namespace["metrics"], namespace["scores"]
    assert np.isfinite(metrics["loss"]) and scores["accuracy"] > 0.85   # zero-shot, this template scores 0.917
