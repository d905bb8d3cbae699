import copy
import dataclasses
import hashlib
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from ptune import partition
from ptune.training import builder, checkpoint, compute, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs scripts/train.py in this process after arranging a fault at the moment $KILL_AT names:
#   step:K    SIGKILL at the start of training step index K (batch_at is called once per step)
#   term:K    SIGTERM there instead (a preemption notice: the run saves and exits)
#   int:K     SIGINT there instead (Ctrl-C: the same)
#   int2:S    SIGINT at the start of the step that completes S, and again inside Orbax's commit of
#             checkpoint S (a second Ctrl-C: the run exits at once)
#   save:S    SIGKILL inside Orbax's commit of checkpoint S, after every byte is written to its
#             temporary directory and before the rename
#   delete:S  SIGKILL half way through removing dropped checkpoint S (one file already gone)
# No fault hook lives in package code.
KILLER = """
import os, runpy, shutil, signal, sys
kind, _, at = os.environ.get("KILL_AT", "none:").partition(":")
from ptune.data import batching
from orbax.checkpoint._src.path import atomicity
batch_at, finalize, rmtree = batching.batch_at, atomicity.AtomicRenameTemporaryPath.finalize, shutil.rmtree
SIGNALS = {"step": signal.SIGKILL, "term": signal.SIGTERM, "int": signal.SIGINT}
def killing_batch_at(arrays, step, *args):
    if (kind in SIGNALS and step == int(at)) or (kind == "int2" and step == int(at) - 1):
        os.kill(os.getpid(), SIGNALS.get(kind, signal.SIGINT))
    return batch_at(arrays, step, *args)
async def killing_finalize(self):
    if kind in ("save", "int2") and self._final_path.name == at:
        os.kill(os.getpid(), signal.SIGKILL if kind == "save" else signal.SIGINT)
    await finalize(self)
def killing_rmtree(path, *args, **kwargs):
    victim = os.path.join(str(path), at)
    if kind == "delete" and os.path.isdir(victim):
        os.remove(next(os.path.join(d, f) for d, _, files in os.walk(victim) for f in files))
        os.kill(os.getpid(), signal.SIGKILL)
    return rmtree(path, *args, **kwargs)
batching.batch_at, atomicity.AtomicRenameTemporaryPath.finalize = killing_batch_at, killing_finalize
shutil.rmtree = killing_rmtree
sys.argv = ["train.py"] + sys.argv[1:]
runpy.run_path(os.path.join(os.environ["PYTHONPATH"], "scripts/train.py"), run_name="__main__")
"""

# experiments/default.py with these overrides, run by the launcher or in process.
OVERRIDES = {"train.steps": 8, "train.log_every": 1, "train.eval_every": 4, "train.progress": False,
             "train.batch_size": 4, "task.max_length": 32,
             "checkpoint.every_steps": 3, "checkpoint.keep": 2, "checkpoint.keep_best": 1}


def launch(workdir, *flags, kill_at=None, config="experiments/default.py", overrides=None):
    """scripts/train.py on `config` with OVERRIDES (or `overrides`), faulted at `kill_at` (see KILLER)."""
    env = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1"}
    if kill_at:
        env["KILL_AT"] = kill_at
    cmd = [sys.executable, "-c", KILLER, "--config", os.path.join(ROOT, config), f"--workdir={workdir}",
           *(f"--config.{k}={v}" for k, v in (overrides or OVERRIDES).items()), *flags]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def launch_config(method="lora", overrides=None):
    """The in-process twin of `launch`'s command line."""
    spec = importlib.util.spec_from_file_location("default", os.path.join(ROOT, "experiments/default.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(method)
    config.update_from_flattened_dict(overrides or OVERRIDES)
    return config


def records(workdir):
    return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def losses(workdir):
    """(step, split, loss, grad_norm) of every record; examples/s is a timing, not a result."""
    return [(r["step"], r["split"], r["loss"], r.get("grad_norm")) for r in records(workdir)]


def steps_on_disk(workdir):
    return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def snapshot(workdir):
    """{relative path: sha256 (files) or "dir"} of everything under `workdir`, to prove a refused
    run changed nothing."""
    out = {}
    for d, dirs, files in os.walk(workdir):
        out.update({os.path.relpath(os.path.join(d, sub), workdir): "dir" for sub in dirs})
        for f in files:
            path = os.path.join(d, f)
            out[os.path.relpath(path, workdir)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


def assert_trees_equal(a, b):
    a, b = partition.flatten(a), partition.flatten(b)
    assert list(a) == list(b)
    for path in a:
        assert np.array_equal(np.asarray(a[path]), np.asarray(b[path])), path


@pytest.fixture(scope="module", autouse=True)
def setup_once():
    """`builder.setup` compiles the model's init (seconds on this CPU); runs of one config share it.
    Each gets its own parameter arrays: training donates them."""
    runs, setup = {}, builder.setup

    def cached(config):
        key = config.to_json()
        if key not in runs:
            runs[key] = setup(config)
        return dataclasses.replace(runs[key], params=jax.tree.map(np.array, runs[key].params))

    builder.setup = cached
    yield
    builder.setup = setup


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of `launch_config`: saves at steps 3, 6 and 8, keeps 6, 8 and the best."""
    workdir = tmp_path_factory.mktemp("reference")
    return workdir, train.train_and_evaluate(launch_config(), str(workdir))


@pytest.fixture
def trained(reference, tmp_path):
    """A copy of the reference workdir, to spoil."""
    workdir = tmp_path / "run"
    shutil.copytree(reference[0], workdir)
    return workdir


def open_checkpoints(workdir, run=None, **config_changes):
    """`Checkpoints` of `workdir` for the reference run, or `run`, with config changes."""
    run = run or builder.setup(launch_config())
    config = copy.deepcopy(run.config)
    config.update_from_flattened_dict(config_changes)
    return checkpoint.Checkpoints(str(workdir), dataclasses.replace(run, config=config), compute.dropout_key(0))


def test_save_restore_round_trip_is_bitwise(tmp_path):
    run = builder.setup(launch_config())
    checkpoints = open_checkpoints(tmp_path, **{"checkpoint.every_steps": 2})
    trainable, frozen = partition.split(run.params, run.labels)
    rng = np.random.default_rng(0)   # every leaf away from its init value, Adam's count included
    trainable, opt_state = jax.tree.map(lambda x: (x + rng.normal(size=x.shape)).astype(x.dtype),
                                        (trainable, run.tx.init(trainable)))
    assert checkpoints.save(1, trainable, opt_state) is None   # not due
    sizes = checkpoints.save(2, trainable, opt_state, {"loss": 0.5})
    checkpoints.close()

    start, restored, restored_opt = open_checkpoints(tmp_path, **{"checkpoint.every_steps": 2}).resume(
        *jax.tree.map(np.zeros_like, (trainable, opt_state)))
    assert start == 2
    assert_trees_equal(restored, trainable)
    assert_trees_equal(restored_opt, opt_state)
    config, adapter, record = checkpoint.load_adapter(str(tmp_path))
    assert_trees_equal(adapter, trainable)
    assert record["step"] == 2 and record["method"] == "lora" and config.method.rank == 8
    assert record["base"]["sha256"] == checkpoint.fingerprint(frozen)
    # The artifact is the adapter's bytes (zstd barely shrinks random floats) plus < 8 kB of metadata;
    # AdamW's two moments triple the resume state.
    assert sizes["trainable_bytes"] == 16_384
    assert 16_384 <= sizes["adapter_bytes"] <= 16_384 + 8_000
    assert 3 * 16_384 <= sizes["checkpoint_bytes"] <= 3 * 16_384 + 20_000


def test_keep_last_n_and_keep_best(tmp_path):
    run = builder.setup(launch_config())
    checkpoints = open_checkpoints(tmp_path, **{"checkpoint.every_steps": 1, "checkpoint.keep_best": 2})
    trainable, _ = partition.split(run.params, run.labels)
    opt_state = run.tx.init(trainable)
    for step, loss in {1: 0.9, 2: 0.3, 3: 0.8, 4: 0.35, 5: 0.95, 6: 0.7}.items():
        checkpoints.save(step, trainable, opt_state, {"loss": loss})
    assert steps_on_disk(tmp_path) == [2, 4, 5, 6]   # the newest 2, and the 2 lowest losses
    assert checkpoint.load_adapter(str(tmp_path), "best")[2]["step"] == 2
    assert checkpoint.load_adapter(str(tmp_path), 4)[2]["step"] == 4


def test_a_drop_cut_short_leaves_only_trash(tmp_path, monkeypatch):
    """Orbax renames a step it drops into the trash (atomic); a kill while ptune empties the trash
    leaves a partial directory only there, and the next open removes it."""
    run = builder.setup(launch_config())
    trainable, _ = partition.split(run.params, run.labels)
    opt_state = run.tx.init(trainable)
    keep_one = {"checkpoint.every_steps": 1, "checkpoint.keep": 1, "checkpoint.keep_best": 0}
    checkpoints = open_checkpoints(tmp_path, **keep_one)
    checkpoints.save(1, trainable, opt_state)
    rmtree = shutil.rmtree

    def killed_half_way(path, *args, **kwargs):   # one file of dropped step 1 removed, then the "kill"
        victim = os.path.join(path, "1")
        if os.path.isdir(victim):
            os.remove(next(os.path.join(d, f) for d, _, files in os.walk(victim) for f in files))
            raise KeyboardInterrupt
        return rmtree(path, *args, **kwargs)
    monkeypatch.setattr(shutil, "rmtree", killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save(2, trainable, opt_state)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", checkpoint.TRASH]
    assert_every_checkpoint_restores(tmp_path)
    assert open_checkpoints(tmp_path, **keep_one).start_step == 2
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]


def test_reference_run_keeps_newest_and_best(reference):
    workdir, final = reference
    evals = {r["step"]: r["loss"] for r in records(workdir) if r["split"] == "validation"}
    assert sorted(evals) == [3, 4, 6, 8]   # eval_every=4, plus every save step for keep-best
    best = min((3, 6, 8), key=evals.get)
    assert steps_on_disk(workdir) == sorted({6, 8, best})
    assert checkpoint.load_adapter(str(workdir), "best")[2]["step"] == best
    assert final["validation_loss"] == evals[8]
    on_disk = checkpoint.sizes(workdir / "checkpoints" / "8")
    # Metadata here (record, Orbax's files, eval history) measured 7.9-8.2 kB between runs.
    assert 0.9 * 16_384 <= on_disk["adapter_bytes"] <= 16_384 + 9_000 < 3 * 16_384 <= on_disk["checkpoint_bytes"]


@pytest.mark.slow
def test_sigkill_mid_run_and_mid_save_then_resume_is_exact(reference, tmp_path):
    workdir, final = reference
    killed = launch(tmp_path, kill_at="step:4")   # during the 5th step: checkpoint 3 is the newest
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert steps_on_disk(tmp_path) == [3]
    assert [r["step"] for r in records(tmp_path) if r["split"] == "train"] == [1, 2, 3, 4]

    killed = launch(tmp_path, kill_at="save:6")   # resumes at 3, dies committing 6
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert "resuming from step 3" in killed.stdout
    leftovers = [d for d in os.listdir(tmp_path / "checkpoints") if not d.isdigit()]
    assert steps_on_disk(tmp_path) == [3] and len(leftovers) == 1 and leftovers[0].startswith("6.orbax-checkpoint-tmp")
    assert checkpoint.load_adapter(str(tmp_path))[2]["step"] == 3

    resumed = launch(tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from step 3" in resumed.stdout
    assert losses(tmp_path) == losses(workdir)   # every step once, with the same numbers
    assert sorted(os.listdir(tmp_path / "checkpoints")) == [str(s) for s in steps_on_disk(workdir)]
    assert_trees_equal(checkpoint.load_adapter(str(tmp_path))[1], checkpoint.load_adapter(str(workdir))[1])
    assert json.load(open(tmp_path / "final_metrics.json"))["validation_loss"] == final["validation_loss"]


# 12 steps saving every 2, keeping the newest 2 (no keep-best, so which steps are dropped is known):
# saves 2..12, and each save from 6 on drops the step 4 before it.
HARNESS = {**OVERRIDES, "train.steps": 12, "train.eval_every": 6, "checkpoint.every_steps": 2,
           "checkpoint.keep_best": 0}


def fault_moments(overrides):
    """Every moment of an uninterrupted run where a fault can strike, in the order they happen."""
    steps, every, keep = overrides["train.steps"], overrides["checkpoint.every_steps"], overrides["checkpoint.keep"]
    moments = []
    for step in range(steps):
        moments.append(f"step:{step}")
        done = step + 1
        if done % every == 0 or done == steps:
            moments.append(f"save:{done}")
            if done - keep * every > 0:
                moments.append(f"delete:{done - keep * every}")
    return moments


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    return workdir, train.train_and_evaluate(launch_config(overrides=HARNESS), str(workdir))


def assert_every_checkpoint_restores(workdir):
    """Every step directory restores (sha256 checked); anything else is Orbax's uncommitted
    temporary directory or ptune's trash, both ignored and removed on the next open."""
    others = [d for d in os.listdir(workdir / "checkpoints") if not d.isdigit()]
    assert all(d == checkpoint.TRASH or ".orbax-checkpoint-tmp" in d for d in others), others
    for step in steps_on_disk(workdir):
        assert checkpoint.load_adapter(str(workdir), step)[2]["step"] == step


def assert_same_as(workdir, reference):
    """Every step logged once with the same numbers, the same final adapter and final metrics."""
    ref_dir, ref_final = reference
    assert losses(workdir) == losses(ref_dir)
    assert_trees_equal(checkpoint.load_adapter(str(workdir))[1], checkpoint.load_adapter(str(ref_dir))[1])
    assert json.load(open(workdir / "final_metrics.json")) == ref_final


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_nothing(uninterrupted, tmp_path):
    """Six SIGKILLs at seeded random moments (steps, inside saves, inside deletions), each run
    resuming the last; then a run to the end equals the uninterrupted one."""
    moments = fault_moments(HARNESS)
    chosen = sorted(random.Random(9).sample(range(len(moments)), 6))
    assert {moments[i].split(":")[0] for i in chosen} >= {"step", "save"}
    for i in chosen:
        killed = launch(tmp_path, kill_at=moments[i], overrides=HARNESS)
        assert killed.returncode == -9, (moments[i], killed.stderr[-2000:])
        if os.path.isdir(tmp_path / "checkpoints"):
            assert_every_checkpoint_restores(tmp_path)
    finished = launch(tmp_path, overrides=HARNESS)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert_every_checkpoint_restores(tmp_path)
    assert steps_on_disk(tmp_path) == steps_on_disk(uninterrupted[0]) == [10, 12]
    assert_same_as(tmp_path, uninterrupted)


@pytest.mark.parametrize("kind,status,name", [pytest.param("term", 143, "SIGTERM", marks=pytest.mark.slow),
                                              ("int", 130, "SIGINT")])
def test_a_signal_saves_the_step_reached_and_resumes_exactly(uninterrupted, tmp_path, kind, status, name):
    """SIGTERM (a preemption notice) and SIGINT (Ctrl-C): the step finishes, is saved, one line, no
    temporary directory, and the rerun equals an uninterrupted run."""
    stopped = launch(tmp_path, kill_at=f"{kind}:4", overrides=HARNESS)   # during step index 4: step 5 completes
    assert stopped.returncode == status, stopped.stderr[-2000:]
    assert "Traceback" not in stopped.stderr
    assert stopped.stderr.strip().splitlines()[-1] == (f"preempted: stopped by {name} saved checkpoint step 5 in "
                                                        f"{tmp_path}/checkpoints; rerun the same command to resume")
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4", "5"]   # no temporary directory
    assert not os.path.exists(tmp_path / "final_metrics.json")
    resumed = launch(tmp_path, overrides=HARNESS)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from step 5" in resumed.stdout
    assert_same_as(tmp_path, uninterrupted)


@pytest.mark.slow
def test_a_second_ctrl_c_exits_at_once_and_loses_nothing(uninterrupted, tmp_path):
    """The second SIGINT lands inside the save the first one asked for: the process exits there,
    every checkpoint on disk restores, and the rerun equals an uninterrupted run."""
    stopped = launch(tmp_path, kill_at="int2:6", overrides=HARNESS)
    assert stopped.returncode == 130, stopped.stderr[-2000:]
    assert stopped.stderr.strip().splitlines()[-1] == "SIGINT again: exiting at once; the checkpoints on disk are kept"
    assert_every_checkpoint_restores(tmp_path)
    assert steps_on_disk(tmp_path) == [2, 4]
    resumed = launch(tmp_path, overrides=HARNESS)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from step 4" in resumed.stdout
    assert_same_as(tmp_path, uninterrupted)


def test_different_base_resumes_when_allowed(trained, capsys):
    """The refusal is in tests/test_catalogue.py."""
    run = builder.setup(launch_config())
    run.params["transformer"]["h_0"]["mlp"]["c_fc"]["kernel"][0, 0] += 1.0   # this run's own numpy copy
    assert open_checkpoints(trained, run, **{"checkpoint.allow_base_mismatch": True}).start_step == 8
    assert "warning: the frozen base differs" in capsys.readouterr().out
