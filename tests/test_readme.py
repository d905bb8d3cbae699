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
