"""Sharded training on fake CPU devices equals one device; the frozen base is split over fsdp x tensor.

The meshes need 8 devices, fixed when JAX starts, so the steps run in a separate process
(tests/multidevice.py) and these tests check what it measured.
"""

import json
import os
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

from ptune import sharding
from ptune.config import base_config
from ptune.training import builder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ["full", "bitfit", "head", "lora", "adapter", "prefix", "prompt", "ptuning_v2", "ia3", "lora+prompt",
           "lora@llama-tiny", "lora@bert-tiny"]
ADAM = ["full:adamw"]


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    out = tmp_path_factory.mktemp("multidevice") / "steps.json"
    env = {**os.environ, "PYTHONPATH": ROOT}
    subprocess.run([sys.executable, os.path.join(ROOT, "tests", "multidevice.py"), str(out), *METHODS, *ADAM],
                   check=True, env=env, cwd=ROOT, timeout=1200)
    return json.loads(out.read_text())


# The three tests of `measured` are slow: it trains every method on every mesh of 8 devices (~140 s).
@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_every_mesh_gives_the_single_device_step(measured, method):
    result = measured[method]
    assert set(result["meshes"]) == {"8x1x1", "2x2x2", "1x2x4"}
    for mesh, row in result["meshes"].items():
        assert row["loss_diff"] <= 1e-5, (mesh, row)
        assert row["param_diff"] <= 1e-5, (mesh, row)
        assert row["step_size"] > 1e-4, "the step must move the parameters for the comparison to mean anything"


@pytest.mark.slow
@pytest.mark.parametrize("method", ADAM)
def test_adam_steps_agree_within_rounding_of_near_zero_gradients(measured, method):
    for mesh, row in measured[method]["meshes"].items():
        assert row["loss_diff"] <= 1e-5, (mesh, row)
        assert row["param_diff"] <= 5e-5, (mesh, row)   # Adam's step is 1e-3 * g/|g|: 5% of one step


@pytest.mark.slow
def test_frozen_base_bytes_shrink_by_fsdp_times_tensor(measured):
    result = measured["lora"]
    kernels = result["full_bytes"]["kernels"]
    for mesh, factor in (("8x1x1", 1), ("2x2x2", 4), ("1x2x4", 8)):
        held = result["meshes"][mesh]["held"]
        assert held["kernels"] * factor == kernels, (mesh, held, kernels)
        # Norms stay replicated and 1-D biases split over one axis: the rest shrinks less.
        assert held["other"] <= result["full_bytes"]["other"]


def test_mesh_and_batch_errors_name_the_fix(make_config):
    config = make_config("lora")
    config.mesh.update(data=3, fsdp=1, tensor=1)
    with pytest.raises(ValueError, match=r"does not divide the 1 devices"):
        builder.setup(config)
    config.mesh.update(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="at most one -1"):
        builder.setup(config)
    config.mesh.update(data=1, fsdp=1)
    config.train.grad_accum = 3
    with pytest.raises(ValueError, match=r"grad_accum=3 must be a positive integer dividing config.train.batch_size=4"):
        builder.setup(config)


def test_batch_not_divisible_by_data_parallel_devices():
    config = base_config()
    config.train.update(batch_size=12, grad_accum=2)
    with pytest.raises(ValueError, match=r"batch_size=12 .* not divisible by the 8 data-parallel devices.*of 16"):
        builder.check_batch_sizes(config.train, 8)


def test_logical_axis_without_rule_and_unknown_mesh_axis():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), sharding.AXES)
    with pytest.raises(ValueError, match=r"logical axis 'experts' has no sharding rule; add config.mesh.rules.experts"):
        sharding.spec_for((4, 4), ("experts", "embed"), sharding.rules_from_config(base_config().mesh), mesh)
    config = base_config()
    config.mesh.rules.embed = "fsdp,model"
    with pytest.raises(ValueError, match=r"config.mesh.rules.embed='fsdp,model' names mesh axes \['model'\]"):
        sharding.rules_from_config(config.mesh)


def test_a_mesh_axis_splits_one_dimension_and_moves_when_it_does_not_divide():
    mesh = types.SimpleNamespace(shape={"data": 2, "fsdp": 2, "tensor": 2})   # spec_for reads only the sizes
    rules = {"embed": ("fsdp",), "mlp": ("fsdp", "tensor"), "vocab": ("tensor",)}
    # embed and mlp both ask for fsdp: the first dimension gets it, the second only tensor.
    assert sharding.spec_for((8, 8), ("embed", "mlp"), rules, mesh) == jax.sharding.PartitionSpec("fsdp", "tensor")
    # 5 words do not divide over tensor=2, so tensor moves to the embedding dimension.
    assert sharding.spec_for((5, 8), ("vocab", "embed"), rules, mesh) == \
        jax.sharding.PartitionSpec(None, ("fsdp", "tensor"))


def test_process_flags_out_of_range():
    with pytest.raises(ValueError, match=r"--process_id=2 must be in 0..1"):
        sharding.initialize_distributed("127.0.0.1:1", 2, 2)
    with pytest.raises(ValueError, match="needs all of --coordinator_address"):
        sharding.initialize_distributed("127.0.0.1:1", None, 0)
