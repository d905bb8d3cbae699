"""README's "Your own data" commands run as written, on files in the formats the README shows, made
from the shipped sentiment sentences and ChatterBot pairs (slow: two short SmolLM2 runs)."""

import json
import os
import re
import subprocess
import sys

import pytest

from ptune.data import tasks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_section():
    readme = open(os.path.join(ROOT, "README.md")).read()
    section = readme.split("## Your own data", 1)[1].split("\n## ", 1)[0]
    return (re.findall(r"```json\n(.+?)\n```", section, re.S), re.findall(r"```bash\n(.+?)\n```", section, re.S))


def write_jsonl(path, records):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def reviews(split: str, n: int) -> list[dict]:
    task = tasks.get("sentiment")
    return [{"review": e["text"], "rating": task.label_names[e["label"]]} for e in task.split(split)[:n]]


def conversations(n: int) -> list[dict]:
    pairs = tasks.get("chatterbot_qa").split("train")[:n]
    return [{"messages": [{"role": "user", "content": p["input"]}, {"role": "assistant", "content": p["output"]}]}
            for p in pairs]


def test_the_readme_shows_two_data_files_and_two_commands():
    shown, commands = readme_section()
    assert len(shown) == 2 and len(commands) == 2
    review_lines = [json.loads(line) for line in shown[0].splitlines()]
    assert all(set(r) == set(reviews("train", 1)[0]) for r in review_lines)
    chats = [json.loads(line) for line in shown[1].splitlines()]
    assert all(set(c) == {"messages"} and any(t["role"] == "assistant" for t in c["messages"]) for c in chats)
    assert "your_data.py:classify" in commands[0] and "your_data.py:chat" in commands[1]


@pytest.mark.slow
@pytest.mark.parametrize("which", [0, 1])
def test_the_readme_commands_run_as_written(tmp_path, which):
    shown, commands = readme_section()
    for name in ("scripts", "experiments"):
        os.symlink(os.path.join(ROOT, name), tmp_path / name)
    shown_records = [json.loads(line) for line in shown[which].splitlines()]
    if which == 0:
        write_jsonl(tmp_path / "data/reviews/train.jsonl", shown_records + reviews("train", 62))
        write_jsonl(tmp_path / "data/reviews/validation.jsonl", reviews("validation", 16))
    else:
        write_jsonl(tmp_path / "data/support/train.jsonl", shown_records + conversations(60))
    command = commands[which].split()
    assert command[0] == "python"
    quick = ["--config.train.steps=2", "--config.train.eval_every=2", "--config.checkpoint.every_steps=0",
             "--config.train.progress=False"]
    done = subprocess.run([sys.executable, *command[1:], *quick], cwd=tmp_path, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    workdir = tmp_path / command[command.index("--workdir") + 1]
    final = json.loads((workdir / "final_metrics.json").read_text())
    task = json.loads((workdir / "task.json").read_text())
    if which == 0:
        assert 0.0 <= final["validation_accuracy"] <= 1.0
        assert task["label_names"] == ["negative", "positive"] and task["verbalizer"] == [" negative", " positive"]
    else:
        assert 1.0 < final["validation_perplexity"] < 1e4 and task["kind"] == "chat"
