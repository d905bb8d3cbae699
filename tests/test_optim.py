import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ptune import optim, partition
from ptune.optim import Group
from ptune.partition import FROZEN, PartitionError
from ptune.training import builder, compute


def _tree():
    params = {"a": jnp.ones(3), "b": jnp.ones(2), "c": jnp.ones(4)}
    labels = {"a": "slow", "b": "fast", "c": FROZEN}
    return params, labels


def test_each_group_gets_its_own_learning_rate():
    params, labels = _tree()
    tx = optim.build(labels, {"slow": Group("sgd", 0.1), "fast": Group("sgd", 0.1, lr_scale=10.0)}, 10)
    trainable, _ = partition.split(params, labels)
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, trainable), tx.init(trainable), trainable)
    np.testing.assert_allclose(updates["a"], -0.1)
    np.testing.assert_allclose(updates["b"], -1.0)
    assert "c" not in updates


def test_warmup_then_decay_schedule():
    sched = optim.schedule(Group(learning_rate=1.0, schedule="linear", warmup_steps=2), total_steps=6)
    assert [float(sched(s)) for s in (0, 1, 2, 4, 6)] == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.0])


def test_label_without_group_and_group_without_label():
    _, labels = _tree()
    with pytest.raises(PartitionError, match=r"label\(s\) \['fast'\] have no optimizer group"):
        optim.build(labels, {"slow": Group()}, 10)
    with pytest.raises(PartitionError, match=r"group\(s\) \['prompt'\] match no trainable label"):
        optim.build(labels, {"slow": Group(), "fast": Group(), "prompt": Group()}, 10)


@pytest.mark.parametrize("lr", [math.nan, math.inf, 0.0, -1e-3])
def test_non_finite_or_non_positive_learning_rate(lr):
    with pytest.raises(ValueError, match="must be a finite number > 0"):
        Group(learning_rate=lr)


def _steps(run, n):
    trainable, frozen = partition.split(run.params, run.labels)
    opt_state = run.tx.init(trainable)
    step = compute.make_train_step(run)
    from ptune.data import batching
    for i in range(n):
        batch = batching.batch_at(run.data["train"], i, 4, 0)
        trainable, opt_state, metrics = step(trainable, opt_state, frozen, batch, jax.random.key(i))
    return trainable, frozen, opt_state


def test_frozen_leaves_bitwise_unchanged_and_trainable_moved(make_config):
    run = builder.setup(make_config("lora", steps=4))
    before = {k: np.asarray(v) for k, v in partition.flatten(run.params).items()}
    trainable, frozen, _ = _steps(run, 4)
    after_frozen = partition.flatten(frozen)
    assert len(after_frozen) == sum(g == FROZEN for g in partition.flatten(run.labels).values())
    for path, value in after_frozen.items():
        assert np.array_equal(np.asarray(value), before[path]), path
    moved = [p for p, v in partition.flatten(trainable).items() if not np.array_equal(np.asarray(v), before[p])]
    assert moved and all(p.endswith(("lora_a", "lora_b")) for p in moved)


@pytest.mark.parametrize("method,options,floats_per_param", [
    ("lora", {}, 2),                         # adamw: mu and nu
    ("lora", {"lr_ratio_b": 16.0}, 2),       # LoRA+: two groups, still 2 per parameter
    ("prompt", {}, 2),
])
def test_optimizer_state_holds_only_trainable(make_config, method, options, floats_per_param):
    run = builder.setup(make_config(method, **options))
    trainable, _ = partition.split(run.params, run.labels)
    state = run.tx.init(trainable)
    assert optim.state_size(state) == floats_per_param * run.summary.trainable
    assert run.summary.trainable < run.summary.total / 5


def test_sgd_without_momentum_has_no_state(make_config):
    config = make_config("ia3")
    config.optim.optimizer = "sgd"
    run = builder.setup(config)
    assert optim.state_size(run.tx.init(partition.split(run.params, run.labels)[0])) == 0


def _weight_gradient_dots(run, trainable, frozen, batch):
    """StableHLO result shapes of every dot in the gradient computation."""
    from ptune.training import objectives

    def loss(t, f):
        return objectives.loss(run.model, partition.merge(t, f), batch, run.objective, run.label_ids)[0]
    text = jax.jit(jax.grad(loss)).lower(trainable, frozen).as_text()
    return [line.rsplit("->", 1)[-1] for line in text.splitlines() if "dot_general" in line]


def test_no_gradient_is_computed_for_frozen_weights(make_config):
    # c_fc's kernel is (64, 256); only its weight gradient produces a 64x256 dot.
    run = builder.setup(make_config("lora"))
    from ptune.data import batching
    batch = batching.batch_at(run.data["train"], 0, 4, 0)
    trainable, frozen = partition.split(run.params, run.labels)
    lora_dots = _weight_gradient_dots(run, trainable, frozen, batch)
    full_dots = _weight_gradient_dots(run, run.params, {}, batch)   # control: everything differentiated
    assert any("tensor<64x256xf32>" in d for d in full_dots)
    assert not any("tensor<64x256xf32>" in d for d in lora_dots)
    assert len(lora_dots) < len(full_dots)
