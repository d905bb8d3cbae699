"""The workdir is owned by one run: a lock naming its holder, stale locks taken over, a finished
run left as it is (or resumed for more steps), and two concurrent launches that never interleave."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from test_catalogue import tiny_config
from test_checkpoint import ROOT, losses, snapshot

from ptune.training import train
from ptune.training import workdir as workdir_lib


def test_a_second_run_on_a_held_workdir_is_refused_naming_the_holder(tmp_path):
    with workdir_lib.owned(str(tmp_path)):
        before = snapshot(tmp_path)
        with pytest.raises(ValueError, match=rf"workdir '{tmp_path}' is in use by the run of pid {os.getpid()} on "
                                             r"host \S+ \(started .*\); wait for it to end, stop it, or choose "
                                             r"another --workdir"):
            train.train_and_evaluate(tiny_config(), str(tmp_path))
        assert snapshot(tmp_path) == before
    assert os.listdir(tmp_path) == []   # released: the lock file goes with the lock


def test_the_lock_of_a_killed_run_is_stale_and_taken_over(tmp_path):
    holder = ("import os, signal, sys\nfrom ptune.training import workdir\n"
              "with workdir.owned(sys.argv[1]):\n    os.kill(os.getpid(), signal.SIGKILL)\n")
    killed = subprocess.run([sys.executable, "-c", holder, str(tmp_path)], env={**os.environ, "PYTHONPATH": ROOT})
    assert killed.returncode == -signal.SIGKILL
    assert "pid" in (tmp_path / ".lock.0").read_text()   # left behind, naming the dead run
    with workdir_lib.owned(str(tmp_path)):
        assert f"pid {os.getpid()} " in (tmp_path / ".lock.0").read_text()


@pytest.mark.slow   # default-suite budget; CI runs it
def test_a_finished_workdir_is_left_as_it_is_and_more_steps_resume(tmp_path, capsys):
    """A rerun of a finished run changes nothing and returns its metrics; asking for more steps
    resumes from its last checkpoint, with the steps an uninterrupted run of that length takes."""
    first = train.train_and_evaluate(tiny_config(), str(tmp_path / "run"))
    before = snapshot(tmp_path / "run")
    capsys.readouterr()
    assert train.train_and_evaluate(tiny_config(), str(tmp_path / "run")) == first
    assert snapshot(tmp_path / "run") == before
    assert capsys.readouterr().out.startswith(f"{tmp_path / 'run'} already holds a finished run of 4 steps "
                                              "(final_metrics.json): nothing to do; raise config.train.steps")
    longer = train.train_and_evaluate(tiny_config(**{"train.steps": 6}), str(tmp_path / "run"))
    assert "resuming from step 4" in capsys.readouterr().out
    straight = train.train_and_evaluate(tiny_config(**{"train.steps": 6}), str(tmp_path / "straight"))
    trained = [[r for r in losses(tmp_path / d) if r[1] == "train"] for d in ("run", "straight")]
    assert trained[0] == trained[1]   # a constant learning rate: the same 6 steps
    assert longer["steps"] == 6 and longer["validation_loss"] == straight["validation_loss"]


def test_a_finished_run_without_checkpoints_cannot_train_further(tmp_path):
    train.train_and_evaluate(tiny_config(**{"checkpoint.every_steps": 0}), str(tmp_path))
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=r"holds a finished run of 4 steps but no checkpoint to train further from "
                                         r"\(config.checkpoint.every_steps=0\); choose another --workdir"):
        train.train_and_evaluate(tiny_config(**{"checkpoint.every_steps": 0, "train.steps": 6}), str(tmp_path))
    assert snapshot(tmp_path) == before


def test_an_unfinished_run_without_checkpoints_starts_afresh_without_stale_records(tmp_path):
    """A run with no checkpoint to resume from starts at step 0, so records of an earlier attempt go."""
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 3, "split": "train", "loss": 9.0}) + "\n")
    train.train_and_evaluate(tiny_config(**{"checkpoint.every_steps": 0}), str(tmp_path))
    steps = [(step, split) for step, split, *_ in losses(tmp_path)]
    assert len(steps) == len(set(steps)) and 9.0 not in [loss for _, _, loss, _ in losses(tmp_path)]


@pytest.mark.slow   # default-suite budget; CI runs it
def test_two_launches_on_one_workdir_never_interleave(tmp_path):
    """The second launch, started while the first trains, exits 2 naming the first; the first's
    metrics.jsonl holds every record once."""
    cmd = [sys.executable, os.path.join(ROOT, "scripts/train.py"),
           "--config", os.path.join(ROOT, "experiments/default.py"),
           f"--workdir={tmp_path}", "--config.train.progress=False", "--config.train.steps=300",
           "--config.train.log_every=1", "--config.train.eval_every=5", "--config.checkpoint.every_steps=50"]
    env = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1"}
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 240
    while not (tmp_path / "metrics.jsonl").exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert first.poll() is None, "the first run ended before the second started: lengthen it"
    _, first_err = first.communicate(timeout=600)
    assert first.returncode == 0, first_err[-2000:]
    assert second.returncode == 2, second.stderr[-2000:]
    [line] = second.stderr.strip().splitlines()
    assert re.fullmatch(rf"error: workdir '{tmp_path}' is in use by the run of pid {first.pid} on host \S+ "
                        r"\(started [^)]*\); wait for it to end, stop it, or choose another --workdir", line), line
    records = [(step, split) for step, split, *_ in losses(tmp_path)]
    assert len(records) == len(set(records)) == 300 + 300 // 5
