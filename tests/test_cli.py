"""The launchers' frame: bad input is one line and exit 2; a bug keeps its traceback."""

import os
import subprocess
import sys

import pytest

LAUNCHER = """
import os
from ptune import cli
from ptune.errors import UserError

def main():
    if os.environ["CASE"] == "bad-input":
        raise UserError("config.method.rank=-1 must be positive; give a rank >= 1")
    [1, 2][int(os.environ["CASE"])]   # a bug: an IndexError, no UserError
    import numpy as np
    np.zeros(3).reshape(2)     # a library's ValueError is a bug too

cli.run(main)
"""


@pytest.mark.parametrize("arg,status,first,last", [
    ("bad-input", 2, "error: config.method.rank=-1 must be positive; give a rank >= 1", None),
    ("5", 1, "Traceback (most recent call last):", "IndexError: list index out of range"),
    ("0", 1, "Traceback (most recent call last):", "ValueError: cannot reshape array of size 3 into shape (2,)"),
])
def test_user_errors_are_one_line_and_bugs_keep_their_traceback(tmp_path, arg, status, first, last):
    script = tmp_path / "launcher.py"
    script.write_text(LAUNCHER)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env={**os.environ, "CASE": arg})
    lines = done.stderr.strip().splitlines()
    assert done.returncode == status, done.stderr
    assert lines[0] == first and (last is None and len(lines) == 1 or lines[-1] == last), done.stderr
