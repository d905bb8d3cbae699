"""A site kind written outside the package (experiments/dora_outside.py) works like a built-in one: it
starts as the identity, trains, resumes exactly, shards on 8 devices, serves in the bank beside LoRA
tasks and merges; a kind that does not say how it exports, banks, merges or shards is refused where
that is attempted, with what to define."""

import dataclasses
import json
import os
import signal
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
import test_bank  # a random base, tasks trained away from their identity, the mixed-batch check
from jax.sharding import AbstractMesh
from test_checkpoint import ROOT, assert_same_as, losses

from ptune import config as config_lib
from ptune import methods, models, partition, sharding
from ptune.data import batching
from ptune.inference import bank as bank_lib
from ptune.interop import hf_peft
from ptune.models import sites
from ptune.models.ops import param
from ptune.training import train

EXPERIMENT = os.path.join(ROOT, "experiments", "dora_outside.py")
IDS = np.array([[11, 12, 13, 14, 15, 16], [17, 18, 19, 20, 21, 22]])


@pytest.fixture(scope="module")
def dora_config():
    """experiments/dora_outside.py (which registers the kind and the method), made tiny: a language model
    whose loss starts near uniform over the bytes, so learning shows in a few steps."""
    config = config_lib.load(EXPERIMENT)
    config.task.update(name="synthetic_lm", options={"n_train": 64, "n_eval": 32})
    config.task.max_length = 32
    config.optim.learning_rate = 1e-2
    config.train.update(steps=8, batch_size=4, eval_batch_size=16, eval_every=4, log_every=1, progress=False)
    config.checkpoint.update(every_steps=2, keep=2)
    return config


def _dora(cfg, **options):
    method = methods.get("mydora", cfg, **options)
    return method, models.build(cfg, method.sites)


def test_the_experiment_defines_kind_and_method_in_40_lines():
    source = open(EXPERIMENT).read().splitlines()
    first = source.index("@dataclasses.dataclass(frozen=True)")
    last = source.index('methods.register("mydora", make)')
    assert last - first + 1 <= 40


def test_dora_starts_as_the_identity(dora_config):
    cfg = models.model_config("gpt2-tiny")
    method, model = _dora(cfg)
    params, plain = models.init(model, jax.random.key(0)), models.build(cfg)
    dora_leaves = [p for p in partition.flatten(params) if sites.kind_of(p) is sites.KINDS["mydora"]]
    assert len(dora_leaves) == 3 * cfg.num_layers   # m, A, B on every c_attn
    base = models.init(plain, jax.random.key(0))
    np.testing.assert_array_equal(model.apply({"params": params}, IDS), plain.apply({"params": base}, IDS))


@pytest.fixture(scope="module")
def uninterrupted(dora_config, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("dora")
    return workdir, train.train_and_evaluate(dora_config, str(workdir))


@pytest.mark.slow   # default-suite budget; CI runs it
def test_dora_trains_and_resumes_exactly(dora_config, uninterrupted, tmp_path, monkeypatch):
    """A SIGTERM during step index 4 saves step 5 and stops; the rerun equals the uninterrupted run."""
    train_losses = [loss for _, split, loss, _ in losses(uninterrupted[0]) if split == "train"]
    assert len(train_losses) == 8 and np.mean(train_losses[-3:]) < np.mean(train_losses[:3]) - 0.1
    batch_at = batching.batch_at

    def preempting_batch_at(arrays, step, *args):
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return batch_at(arrays, step, *args)
    monkeypatch.setattr(batching, "batch_at", preempting_batch_at)
    with pytest.raises(train.Preempted, match="saved checkpoint step 5"):
        train.train_and_evaluate(dora_config, str(tmp_path))
    monkeypatch.setattr(batching, "batch_at", batch_at)
    train.train_and_evaluate(dora_config, str(tmp_path))
    assert_same_as(tmp_path, uninterrupted)


# One train step of the DoRA method on 1 device and on meshes of 8 fake CPU devices (tests/multidevice.py).
SHARDED = """
import runpy, sys
import jax
jax.config.update("jax_num_cpu_devices", 8)
from ptune import config
config.load_module(sys.argv[2])
sys.argv = ["multidevice.py", sys.argv[1], "mydora"]
runpy.run_path("tests/multidevice.py", run_name="__main__")
"""


@pytest.mark.slow   # ~20 s: a process of its own, four meshes compiled (the built-in kinds' twins are slow too)
def test_dora_shards_on_8_devices_like_one(tmp_path):
    out = tmp_path / "steps.json"
    subprocess.run([sys.executable, "-c", SHARDED, str(out), EXPERIMENT], check=True, cwd=ROOT, timeout=600,
                   env={**os.environ, "PYTHONPATH": ROOT})
    meshes = json.loads(out.read_text())["mydora"]["meshes"]
    assert set(meshes) == {"8x1x1", "2x2x2", "1x2x4"}
    for mesh, row in meshes.items():
        assert row["loss_diff"] <= 1e-5 and row["param_diff"] <= 1e-5, (mesh, row)
        assert row["step_size"] > 1e-4, "the step must move the parameters for the comparison to mean anything"


def test_dora_serves_in_the_bank_beside_lora_tasks(dora_config):
    cfg, base = test_bank._base("gpt2-tiny")
    runs, adapters = test_bank._tasks(cfg, base, {
        "mydora": ("mydora", {"rank": 4}, (65, 66)),
        "lora4": ("lora", {"rank": 4, "alpha": 8.0}, (70, 71, 72)),
        "lora8_mlp": ("lora", {"rank": 8, "targets": ["c_fc"]}, (80, 81))})
    bank = bank_lib.Bank(cfg, base, adapters, capacity=4)
    assert bank.sites.names() == ["lora", "mydora"]
    test_bank._check_mixed_batch(bank, runs, ["mydora", "lora4", "mydora", "lora8_mlp", "lora4"], test_bank.PROMPTS)


def test_dora_merges_into_the_kernels(dora_config):
    cfg, base = test_bank._base("gpt2-tiny")
    model, method, params = test_bank._trained(cfg, base, "mydora", 0, rank=4)
    merged, left = hf_peft.merge(params, model)
    assert left == models.Sites() and not any(sites.is_site(p) for p in partition.flatten(merged))
    np.testing.assert_allclose(models.build(cfg).apply({"params": merged}, IDS),
                               model.apply({"params": params}, IDS), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------ a kind that says too little

@dataclasses.dataclass(frozen=True)
class GainSpec:
    targets: str


class Gain(sites.SiteKind):
    """A learned output gain: says how it attaches to a linear layer, and nothing else."""
    name, spec, leaves, wraps = "gain", GainSpec, r"/gain$", "layer"

    def linear(self, spec, call, x, inner):
        layer = call.layer
        return inner(x) * param(layer, "gain", nn.initializers.ones, (layer.features,), (layer.axes[1],))


@pytest.fixture
def gain():
    """(config, method, model, params) of a gpt2-tiny with a gain on every c_attn; unregistered afterwards."""
    sites.register(Gain())
    cfg = models.model_config("gpt2-tiny")
    method = methods.Method("gain", sites.Sites(gain=GainSpec(r"c_attn$")), rules=[(r"/gain$", "gain")])
    model = models.build(cfg, method.sites)
    yield cfg, method, model, models.init(model, jax.random.key(0))
    sites.KINDS.pop("gain")


def test_a_kind_that_does_not_say_is_refused_where_it_must(gain, tmp_path):
    cfg, method, model, params = gain
    with pytest.raises(sites.MissingHook, match=r"site kind 'gain' does not say its HF PEFT format: define "
                                                r"Gain.peft_export"):
        hf_peft.export(tmp_path / "peft", params, method, cfg)
    with pytest.raises(ValueError, match=r"also has \['gain'\] sites.*merges if it defines SiteKind.merge"):
        hf_peft.save_pretrained_merged(tmp_path / "merged", params, model)
    trainable, frozen = partition.split(params, method.labels(params))
    with pytest.raises(sites.MissingHook, match="does not say how the adapter bank stacks it: define Gain.bank_spec"):
        bank_lib.Bank(cfg, frozen, {"t": bank_lib.TaskAdapter(method.sites, trainable)})
    boxed, mesh_config = models.abstract_params(model), config_lib.base_config().mesh
    sharding.param_shardings(params, boxed, sharding.make_mesh(mesh_config), mesh_config)   # one device: fine
    with pytest.raises(sites.MissingHook, match=r"how it is sharded \(leaf transformer/h_0/attn/c_attn/gain\): "
                                                r"define Gain.sharding"):
        sharding.param_shardings(params, boxed, AbstractMesh((2, 1, 1), sharding.AXES), mesh_config)
    assert not (tmp_path / "peft").exists() and not (tmp_path / "merged").exists()


def test_a_kind_must_name_its_leaves(gain):
    cfg = gain[0]
    with pytest.raises(ValueError, match="set `leaves`, a regex matching the parameter paths it adds"):
        sites.register(type("Nameless", (Gain,), {"name": "nameless", "leaves": ""})())
    with pytest.raises(ValueError, match="overrides `linear` sets wraps to one of"):
        sites.register(type("Unplaced", (Gain,), {"name": "unplaced", "wraps": None})())
    narrow = sites.Sites(gain=GainSpec(r"(c_attn|c_fc)$"))
    sites.KINDS["gain"].leaves = r"attn/c_attn/gain$"   # misses the gains it puts on c_fc
    with pytest.raises(ValueError, match=r"added \['transformer/h_0/mlp/c_fc/gain'.*which no site kind's `leaves`"):
        models.init(models.build(cfg, narrow), jax.random.key(0))
    with pytest.raises(ValueError, match=r"method gain: targets 'nothing\$' match no layer"):
        models.init(models.build(cfg, sites.Sites(gain=GainSpec("nothing$"))), jax.random.key(0))
