"""Serving trained workdirs: mixed classification and generation requests match each run's own model."""

import numpy as np
import pytest

from ptune import partition
from ptune.inference import generate, serve
from ptune.training import builder, checkpoint, objectives, train


def _workdirs(tmp_path, make_config):
    """Two tiny runs on one random-init base: LoRA classifying by verbalizer, IA3 language modelling."""
    configs = {"sentiment": make_config("lora", steps=2), "lm": make_config("ia3", steps=2)}
    configs["lm"].task.name = "synthetic_lm"
    dirs = {name: str(tmp_path / name) for name in configs}
    for name, config in configs.items():
        train.train_and_evaluate(config, dirs[name])
    return dirs, configs


def _trained(config, workdir):
    run = builder.setup(config)
    _, trainable, _ = checkpoint.load_adapter(workdir)
    return run, partition.merge(trainable, partition.split(run.params, run.labels)[1])


@pytest.mark.slow   # default-suite budget; CI runs it
def test_mixed_requests_match_each_run_alone(tmp_path, make_config, monkeypatch):
    dirs, configs = _workdirs(tmp_path, make_config)
    reads = []   # the tasks' one base is read once, not once per task and again for the bank
    monkeypatch.setattr(builder, "base_model", lambda config, read=builder.base_model: reads.append(1) or read(config))
    server = serve.load(dirs, batch_size=4, max_new_tokens=5)
    assert len(reads) == 1
    monkeypatch.undo()
    run, params = _trained(configs["sentiment"], dirs["sentiment"])
    texts = [e["text"] for e in run.task.split("validation")[:3]]
    requests = [{"task": "lm", "text": "the film"}, {"task": "sentiment", "text": texts[0]},
                {"task": "sentiment", "text": texts[1]}, {"task": "lm", "text": "a"},
                {"task": "sentiment", "text": texts[2]}]
    predictions = server.predict(requests)
    assert [p["task"] for p in predictions] == [r["task"] for r in requests]

    batch = {k: v[:3] for k, v in run.data["validation"].items()}
    expected = np.argmax(objectives.class_logits(run.model, params, batch, "verbalizer", run.label_ids), -1)
    assert [p["label"] for p in predictions if p["task"] == "sentiment"] == expected.tolist()
    assert {p["prediction"] for p in predictions if p["task"] == "sentiment"} <= {"bad", "good"}

    lm_run, lm_params = _trained(configs["lm"], dirs["lm"])
    tok = lm_run.tokenizer
    prompts = [tok.prefix_ids + tok.encode(text) for text in ("the film", "a")]
    tokens = generate.generate(lm_run.model, lm_params, prompts, 5, eos_id=tok.eos_id, pad_id=tok.pad_id)
    expected_text = [tok.decode([t for t in row if t != tok.pad_id and t != tok.eos_id]) for row in tokens]
    assert [p["prediction"] for p in predictions if p["task"] == "lm"] == expected_text

    with pytest.raises(ValueError, match=r"unknown task\(s\) \['spam'\]; the bank holds \['lm', 'sentiment'\]"):
        server.predict([{"task": "sentiment", "text": "ok"}, {"task": "spam", "text": "buy"}])
    with pytest.raises(ValueError, match="request 0 is .*; each request needs a string 'task' and 'text'"):
        server.predict([{"task": "sentiment"}])
