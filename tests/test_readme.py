import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ci_runs_the_readme_test_command():
    readme = open(os.path.join(ROOT, "README.md")).read()
    quickstart = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.+?)\n```", quickstart, re.S)
    assert len(commands) == 2, "the quickstart has exactly two commands"
    ci = open(os.path.join(ROOT, ".ci/run")).read().splitlines()
    assert commands[1] in ci, "CI runs README's test command (as one line; the slow tests may follow)"


def test_ci_runs_the_readme_first_command_on_a_fresh_machine():
    """.ci/fresh_machine runs README's first command with overrides appended: it must install no
    extra (so no torch) and end in the training script's flags."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    quickstart = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    first = re.findall(r"```bash\n(.+?)\n```", quickstart, re.S)[0]
    assert first.startswith("python3 -m venv .venv && .venv/bin/pip install -q -e . && ")
    assert re.search(r"&& \.venv/bin/python scripts/train\.py [^&|;]*--workdir \S+$", first)
    assert "bash .ci/fresh_machine" in open(os.path.join(ROOT, ".ci/run")).read().splitlines()
