import csv
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ptune import partition
from ptune.data import batching
from ptune.training import compute, multi, sweep, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A tiny experiment for the launcher: 2 points of 2 steps each.
EXPERIMENT = '''
from ptune.config import base_config, with_method

def get_config():
    config = with_method(base_config(), "lora", rank=2)
    config.task.options = {{"n_train": 16, "n_eval": 8}}
    config.task.max_length = 32
    config.train.update(steps=2, batch_size=4, eval_batch_size=8, log_every=1, progress=False)
    return config

def get_sweep():
    return {sweep}
'''


def test_product_expands_every_combination_with_stable_names(make_config):
    axes = {"method.rank": [2, 4], "optim.learning_rate": [1e-3, 1e-2, 0.1]}
    points = sweep.points(make_config(), sweep.product(axes))
    assert [p.name for p in points[:4]] == ["method.rank=2,optim.learning_rate=0.001",
                                            "method.rank=2,optim.learning_rate=0.01",
                                            "method.rank=2,optim.learning_rate=0.1",
                                            "method.rank=4,optim.learning_rate=0.001"]
    assert [(p.config.method.rank, p.config.optim.learning_rate) for p in points] == [
        (2, 1e-3), (2, 1e-2), (2, 0.1), (4, 1e-3), (4, 1e-2), (4, 0.1)]
    grouped = sweep.points(make_config(), [{"optim.groups.lora.learning_rate": 0.5, "task.options.n_train": 8}])
    assert grouped[0].config.optim.groups.lora.learning_rate == 0.5
    assert grouped[0].config.task.options.n_train == 8
    assert sweep.points(make_config(), [{}])[0].name == "base"


@pytest.mark.parametrize("overrides,message", [
    ({"method.rnk": 2}, r"sweep point 0 \(method.rnk=2\): config key 'method.rnk' does not exist; "
                        r"valid keys under config.method: \['alpha', 'dropout'"),
    ({"trian.steps": 2}, r"config key 'trian.steps' does not exist; valid keys under config: \['checkpoint', 'eval', 'imports', 'mesh'"),
    ({"model.num_layrs": 1}, r"config key 'model.num_layrs' does not exist"),
    ({"seed.x": 1}, r"config key 'seed.x' does not exist; config.seed is a value, not a section"),
])
def test_unknown_key_is_an_error_naming_it(make_config, overrides, message):
    with pytest.raises(ValueError, match=message):
        sweep.points(make_config(), [overrides])


@pytest.mark.parametrize("n", [1, 5, 7])
def test_host_split_runs_every_point_exactly_once(n):
    items = list(range(n))
    for num_hosts in (1, 2, 3, 8):
        shares = [sweep.for_host(items, h, num_hosts) for h in range(num_hosts)]
        assert sorted(i for share in shares for i in share) == items
        assert max(map(len, shares)) - min(map(len, shares)) <= 1   # balanced
    with pytest.raises(ValueError, match=r"--host_index=3 is out of range for --num_hosts=3 \(0..2\)"):
        sweep.for_host(items, 3, 3)
    with pytest.raises(ValueError, match=r"--num_hosts=0 must be at least 1"):
        sweep.for_host(items, 0, 0)


def test_vmap_groups_split_on_keys_vmap_cannot_batch(make_config):
    points = sweep.points(make_config(), sweep.product(
        {"method.rank": [2, 4], "seed": [0, 1], "optim.groups.lora.learning_rate": [0.1, 0.2]}))
    groups = sweep.vmap_groups(points)
    assert [[p.config.method.rank for p in g] for g in groups] == [[2] * 4, [4] * 4]


def _run_sweep(tmp_path, sweep_text, *flags):
    config = tmp_path / "experiment.py"
    config.write_text(EXPERIMENT.format(sweep=sweep_text))
    cmd = [sys.executable, os.path.join(ROOT, "scripts/sweep.py"), f"--config={config}",
           f"--workdir={tmp_path / 'sweep'}", *flags]
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def test_sweep_skips_finished_points_and_collects_the_table(tmp_path):
    done = tmp_path / "sweep" / "seed=1"
    done.mkdir(parents=True)
    (done / "final_metrics.json").write_text(json.dumps({"validation_accuracy": 0.25}))
    proc = _run_sweep(tmp_path, '[{"seed": 0}, {"seed": 1}]')
    assert proc.returncode == 0, proc.stderr
    assert "skip seed=1: finished" in proc.stdout and "2 of 2 points finished" in proc.stdout
    trained = json.load(open(tmp_path / "sweep" / "seed=0" / "final_metrics.json"))
    assert trained["trainable_params"] == 1024
    assert not (done / "metrics.jsonl").exists()    # the finished point was not run again
    rows = [json.loads(line) for line in open(tmp_path / "sweep" / "results.jsonl")]
    assert rows == [{"point": "seed=0", "seed": 0, **trained}, {"point": "seed=1", "seed": 1, "validation_accuracy": 0.25}]
    table = list(csv.DictReader(open(tmp_path / "sweep" / "results.csv")))
    assert [r["point"] for r in table] == ["seed=0", "seed=1"]
    assert float(table[0]["validation_accuracy"]) == trained["validation_accuracy"]
    assert table[1]["validation_accuracy"] == "0.25" and table[1]["train_loss"] == ""


@pytest.mark.parametrize("sweep_text,flags,message", [
    ('[{"seed": 0}]', ["--num_hosts=2", "--host_index=2"], "--host_index=2 is out of range for --num_hosts=2"),
    ('[{"method.rnk": 4}]', [], "config key 'method.rnk' does not exist"),
])
def test_sweep_bad_input_exits_2_with_one_line(tmp_path, sweep_text, flags, message):
    proc = _run_sweep(tmp_path, sweep_text, *flags)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and message in proc.stderr
    assert not (tmp_path / "sweep").exists()


def test_print_commands_one_per_host(tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location("sweep_script", os.path.join(ROOT, "scripts/sweep.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    commands = script.host_commands(["scripts/sweep.py", "--config=e.py", "--host_index", "1", "--workdir=w",
                                     "--print_commands", "--vmap"], 3)
    assert commands == [f"python scripts/sweep.py --config=e.py --workdir=w --vmap --num_hosts=3 --host_index={i}"
                        for i in range(3)]


def _point_config(make_config, seed, learning_rate, **overrides):
    config = make_config("lora", steps=4, rank=2, dropout=0.1)   # dropout: the per-point rng matters
    config.seed, config.optim.learning_rate = seed, learning_rate
    for key, value in overrides.items():
        section, name = key.split(".")
        config[section][name] = value
    return config


@pytest.mark.slow   # ~40 s
def test_vmapped_points_equal_separate_runs(make_config, tmp_path, monkeypatch):
    configs = [_point_config(make_config, s, lr) for s, lr in [(0, 1e-3), (1, 3e-3), (2, 1e-2)]]
    for c in configs:   # the final evaluation suite runs per point in both paths
        c.eval.splits = "test"
    final_params = []   # the parameters of every evaluation: here only the one after the last step
    evaluate = compute.evaluate

    def keep_params(run, params, *args, **kwargs):
        final_params.append(jax.tree.map(np.asarray, partition.split(params, run.labels)[0]))
        return evaluate(run, params, *args, **kwargs)
    monkeypatch.setattr(compute, "evaluate", keep_params)

    vmapped = multi.train_and_evaluate(configs, [str(tmp_path / f"v{i}") for i in range(3)])
    separate = [train.train_and_evaluate(c, str(tmp_path / f"s{i}")) for i, c in enumerate(configs)]
    files = lambda d: sorted(f.split(".")[0] for f in os.listdir(d))   # event files carry a timestamp
    assert files(tmp_path / "v0") == ["config", "events", "final_metrics", "metrics", "task"]
    assert files(tmp_path / "s0") == ["checkpoints"] + files(tmp_path / "v0")   # vmapped points save none
    for i in range(3):
        logged = [[(m["step"], m["split"], m["loss"]) for m in map(json.loads, open(tmp_path / f"{d}{i}" / "metrics.jsonl"))]
                  for d in "vs"]
        assert [l[:2] for l in logged[0]] == [l[:2] for l in logged[1]] == \
            [(1, "train"), (2, "train"), (3, "train"), (4, "train"), (4, "validation")]
        np.testing.assert_allclose([l[2] for l in logged[0]], [l[2] for l in logged[1]], atol=1e-5, rtol=0)
        assert vmapped[i]["validation_accuracy"] == separate[i]["validation_accuracy"]
        assert vmapped[i]["test_accuracy"] == separate[i]["test_accuracy"]
        a, b = partition.flatten(final_params[i]), partition.flatten(final_params[3 + i])
        assert a.keys() == b.keys()
        for path in a:
            np.testing.assert_allclose(a[path], b[path], atol=1e-5, rtol=0, err_msg=path)
    # The points really differ: different seeds and learning rates give different adapters.
    assert not np.allclose(*(partition.flatten(final_params[i])["transformer/h_0/attn/c_attn/lora_b"]
                             for i in (0, 1)))


@pytest.mark.slow   # default-suite budget; CI runs it
def test_points_with_one_seed_share_the_frozen_base_and_chunks_compute_the_same(make_config):
    m = multi.setup([_point_config(make_config, 0, lr) for lr in (1e-3, 1e-2, 3e-2)])
    assert m.frozen_axis is None
    assert partition.flatten(m.trainable)["transformer/h_0/attn/c_attn/lora_b"].shape == (3, 2, 192)
    batch = {k: np.stack([v] * 3) for k, v in batching.batch_at(m.runs[0].data["train"], 0, 4, 0).items()}
    rngs = jax.random.split(jax.random.key(0), 3)
    copy = lambda: jax.tree.map(jnp.array, (m.trainable, m.opt_state))
    whole = multi.make_train_step(m)(*copy(), m.frozen, batch, rngs)
    chunked = multi.make_train_step(m, chunk=2)(*copy(), m.frozen, batch, rngs)   # chunks of 2 and 1
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(chunked)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    lora_b = partition.flatten(whole[0])["transformer/h_0/attn/c_attn/lora_b"]
    assert not np.allclose(lora_b[0], lora_b[1])    # one step at two learning rates


@pytest.mark.parametrize("overrides,message", [
    ({"method.rank": 4}, r"vmapped points 0 and 1 differ in \['method.rank'\], which changes the shape of "
                         r"trainable transformer/h_0/attn/c_attn/lora_a: \(64, 2\) float32 vs \(64, 4\) float32"),
    ({"task.max_length": 48}, r"differ in \['task.max_length'\], which changes the train batch shape of "
                              r"input_ids: \(32,\) vs \(48,\)"),
    ({"train.log_every": 2}, r"differ in \['train.log_every'\], which vmap cannot batch"),
])
def test_vmapped_points_that_cannot_batch_name_the_key(make_config, overrides, message):
    with pytest.raises(ValueError, match=message):
        multi.setup([_point_config(make_config, 0, 1e-3), _point_config(make_config, 0, 1e-3, **overrides)])
