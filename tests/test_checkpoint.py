import copy
import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from ptune import checkpoint, partition, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs scripts/train.py in this process after arranging a SIGKILL: at the start of training
# step KILL_STEP (batch_at is called once per step), or inside Orbax's commit of checkpoint
# KILL_SAVE, after every byte is written to its temporary directory and before the rename.
KILLER = """
import os, runpy, signal, sys
kill_step, kill_save = int(os.environ.get("KILL_STEP", -1)), os.environ.get("KILL_SAVE")
from ptune.data import batching
from orbax.checkpoint._src.path import atomicity
batch_at, finalize = batching.batch_at, atomicity.AtomicRenameTemporaryPath.finalize
def killing_batch_at(arrays, step, *args):
    if step == kill_step:
        os.kill(os.getpid(), signal.SIGKILL)
    return batch_at(arrays, step, *args)
async def killing_finalize(self):
    if self._final_path.name == kill_save:
        os.kill(os.getpid(), signal.SIGKILL)
    await finalize(self)
batching.batch_at, atomicity.AtomicRenameTemporaryPath.finalize = killing_batch_at, killing_finalize
sys.argv = ["train.py"] + sys.argv[1:]
runpy.run_path(os.path.join(os.environ["PYTHONPATH"], "scripts/train.py"), run_name="__main__")
"""

# experiments/default.py with these overrides, run by the launcher or in process.
OVERRIDES = {"train.steps": 8, "train.log_every": 1, "train.eval_every": 4, "train.progress": False,
             "train.batch_size": 4, "task.max_length": 32,
             "checkpoint.every_steps": 3, "checkpoint.keep": 2, "checkpoint.keep_best": 1}


def launch(workdir, *flags, kill_step=None, kill_save=None, config="experiments/default.py"):
    env = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1"}
    env.update({k: str(v) for k, v in (("KILL_STEP", kill_step), ("KILL_SAVE", kill_save)) if v is not None})
    cmd = [sys.executable, "-c", KILLER, "--config", os.path.join(ROOT, config), f"--workdir={workdir}",
           *(f"--config.{k}={v}" for k, v in OVERRIDES.items()), *flags]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def launch_config(method="lora"):
    """The in-process twin of `launch`'s command line."""
    spec = importlib.util.spec_from_file_location("default", os.path.join(ROOT, "experiments/default.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(method)
    config.update_from_flattened_dict(OVERRIDES)
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
    """`train.setup` compiles the model's init (seconds on this CPU); runs of one config share it.
    Each gets its own parameter arrays: training donates them."""
    runs, setup = {}, train.setup

    def cached(config):
        key = config.to_json()
        if key not in runs:
            runs[key] = setup(config)
        return dataclasses.replace(runs[key], params=jax.tree.map(np.array, runs[key].params))

    train.setup = cached
    yield
    train.setup = setup


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
    run = run or train.setup(launch_config())
    config = copy.deepcopy(run.config)
    config.update_from_flattened_dict(config_changes)
    return checkpoint.Checkpoints(str(workdir), dataclasses.replace(run, config=config), train.dropout_key(0))


def test_save_restore_round_trip_is_bitwise(tmp_path):
    run = train.setup(launch_config())
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
    run = train.setup(launch_config())
    checkpoints = open_checkpoints(tmp_path, **{"checkpoint.every_steps": 1, "checkpoint.keep_best": 2})
    trainable, _ = partition.split(run.params, run.labels)
    opt_state = run.tx.init(trainable)
    for step, loss in {1: 0.9, 2: 0.3, 3: 0.8, 4: 0.35, 5: 0.95, 6: 0.7}.items():
        checkpoints.save(step, trainable, opt_state, {"loss": loss})
    assert steps_on_disk(tmp_path) == [2, 4, 5, 6]   # the newest 2, and the 2 lowest losses
    assert checkpoint.load_adapter(str(tmp_path), "best")[2]["step"] == 2
    assert checkpoint.load_adapter(str(tmp_path), 4)[2]["step"] == 4


def test_reference_run_keeps_newest_and_best(reference):
    workdir, final = reference
    evals = {r["step"]: r["loss"] for r in records(workdir) if r["split"] == "validation"}
    assert sorted(evals) == [3, 4, 6, 8]   # eval_every=4, plus every save step for keep-best
    best = min((3, 6, 8), key=evals.get)
    assert steps_on_disk(workdir) == sorted({6, 8, best})
    assert checkpoint.load_adapter(str(workdir), "best")[2]["step"] == best
    assert final["validation_loss"] == evals[8]
    on_disk = checkpoint.sizes(workdir / "checkpoints" / "8")
    assert 0.9 * 16_384 <= on_disk["adapter_bytes"] <= 16_384 + 8_000 < 3 * 16_384 <= on_disk["checkpoint_bytes"]


@pytest.mark.slow
def test_sigkill_mid_run_and_mid_save_then_resume_is_exact(reference, tmp_path):
    workdir, final = reference
    killed = launch(tmp_path, kill_step=4)   # during the 5th step: checkpoint 3 is the newest
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert steps_on_disk(tmp_path) == [3]
    assert [r["step"] for r in records(tmp_path) if r["split"] == "train"] == [1, 2, 3, 4]

    killed = launch(tmp_path, kill_save=6)   # resumes at 3, dies committing 6
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


def refused(workdir, message, make):
    """`make()` raises a ValueError matching `message` and changes no file in `workdir`."""
    before = snapshot(workdir)
    with pytest.raises(ValueError, match=message):
        make()
    assert snapshot(workdir) == before


def test_other_method_or_shape_is_refused(trained):
    config = launch_config()
    config.method.rank = 4
    refused(trained, r"trainable 'transformer/h_0/attn/c_attn/lora_a' is float32\[64, 8\] in checkpoint "
                     r".*/checkpoints/8 but float32\[64, 4\] in this run",
            lambda: train.train_and_evaluate(config, str(trained)))
    refused(trained, r"written by method 'lora' but this run uses 'prompt'; set config.method.name='lora'",
            lambda: train.train_and_evaluate(launch_config("prompt"), str(trained)))


def test_different_base_is_refused_unless_allowed(trained, capsys):
    run = train.setup(launch_config())
    run.params["transformer"]["h_0"]["mlp"]["c_fc"]["kernel"][0, 0] += 1.0   # this run's own numpy copy
    refused(trained, r"frozen base differs .* \(sha256 \w{12}… of preset 'gpt2-tiny' \(seed 0\), now \w{12}… "
                     r".*set config.checkpoint.allow_base_mismatch=True to resume anyway",
            lambda: open_checkpoints(trained, run))
    assert open_checkpoints(trained, run, **{"checkpoint.allow_base_mismatch": True}).start_step == 8
    assert "warning: the frozen base differs" in capsys.readouterr().out


def test_changed_data_order_is_refused(trained):
    refused(trained, r"written with data batch_size=4 but this run has 8, so the batches after step 8 would differ",
            lambda: open_checkpoints(trained, **{"train.batch_size": 8}))


# Orbax leaves an asyncio callback behind when tensorstore fails a read; it is harmless here.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["truncate trainable", "flip trainable", "truncate meta"])
def test_damaged_checkpoint_is_refused(trained, damage):
    how, item = damage.split()
    step_dir = trained / "checkpoints" / "8" / item
    if item == "trainable":   # the biggest array data file
        target = max((step_dir / "ocdbt.process_0" / "d").iterdir(), key=lambda p: p.stat().st_size)
    else:
        target = step_dir / "metadata"
    data = bytearray(target.read_bytes())
    if how == "truncate":
        del data[len(data) // 2:]
    else:   # one bit in the middle: zstd may still decode it, the recorded sha256 must not match
        data[len(data) // 2] ^= 1
    target.write_bytes(data)
    message = r"checkpoint .*/checkpoints/8 is damaged \(.*\); delete .*/checkpoints/8 to resume from step 6"
    refused(trained, message, lambda: open_checkpoints(trained))
    with pytest.raises(ValueError, match=message):
        checkpoint.load_adapter(str(trained))


def test_cli_refusal_is_one_line_and_exit_2(trained):
    before = snapshot(trained)
    proc = launch(trained, config="experiments/default.py:prompt")
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "written by method 'lora' but this run uses 'prompt'" in errors[0]
    assert snapshot(trained) == before


def test_bad_checkpoint_options_write_nothing(make_config, tmp_path):
    config = make_config("lora")
    config.checkpoint.update(keep_best=1, best_metric="perplexity")
    with pytest.raises(ValueError, match=r"best_metric='perplexity' is not an eval metric of the verbalizer "
                                         r"objective; choose one of \('loss', 'accuracy'\)"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    config.checkpoint.update(best_metric="loss", keep=0)
    with pytest.raises(ValueError, match=r"config.checkpoint.keep=0 must be an integer >= 1"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    config.checkpoint.keep = 1
    config.checkpoint.unlock()
    config.checkpoint.every = 5
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['config.checkpoint.every'\]"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
