import jax.numpy as jnp
import numpy as np
import pytest

from ptune import partition
from ptune.partition import FROZEN, PartitionError


@pytest.fixture
def params():
    return {"encoder": {"layer_0": {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)},
                                    "lora_a": jnp.ones((4, 2), jnp.bfloat16)}},
            "head": {"kernel": jnp.ones((3, 2))}}


def test_paths_are_slash_joined(params):
    assert list(partition.flatten(params)) == [
        "encoder/layer_0/dense/bias", "encoder/layer_0/dense/kernel", "encoder/layer_0/lora_a", "head/kernel"]


def test_first_matching_rule_wins_and_default_covers_the_rest(params):
    labels = partition.label(params, [("lora_", "lora"), ("/bias$", "bias"), ("layer_0", "never")],
                             default=FROZEN)
    assert partition.flatten(labels) == {"encoder/layer_0/dense/bias": "bias",
                                         "encoder/layer_0/dense/kernel": "never",
                                         "encoder/layer_0/lora_a": "lora", "head/kernel": FROZEN}


def test_label_function(params):
    labels = partition.label(params, lambda path, leaf: "big" if leaf.size > 6 else None, default=FROZEN)
    assert partition.groups(labels) == ["big"]
    assert partition.flatten(labels)["encoder/layer_0/dense/bias"] == FROZEN


def test_rule_matching_nothing_names_rule_and_nearest_paths(params):
    with pytest.raises(PartitionError, match=r"'lora_b' -> 'lora'.*matches no parameter.*encoder/layer_0/lora_a"):
        partition.label(params, [("lora_b", "lora")], default=FROZEN)


def test_invalid_regex(params):
    with pytest.raises(PartitionError, match=r"rule #1 regex 'dense\(' does not compile"):
        partition.label(params, [("lora", "lora"), ("dense(", "x")], default=FROZEN)


def test_uncovered_leaf_without_default(params):
    with pytest.raises(PartitionError, match=r"3 parameter\(s\) covered by no rule.*catch-all"):
        partition.label(params, [("lora_", "lora")])


def test_labels_must_be_strings(params):
    with pytest.raises(PartitionError, match="must be non-empty strings"):
        partition.label(params, lambda p, x: 3)


def test_zero_trainable(params):
    labels = partition.label(params, [(".*", FROZEN)])
    with pytest.raises(PartitionError, match="zero trainable"):
        partition.require_trainable(labels, "method x")


def test_split_and_merge_partition_every_leaf_once(params):
    labels = partition.label(params, [("lora_|head", "t")], default=FROZEN)
    trainable, frozen = partition.split(params, labels)
    assert sorted(partition.flatten(trainable)) == ["encoder/layer_0/lora_a", "head/kernel"]
    assert sorted(partition.flatten(frozen)) == ["encoder/layer_0/dense/bias", "encoder/layer_0/dense/kernel"]
    merged = partition.merge(trainable, frozen)
    assert partition.flatten(merged).keys() == partition.flatten(params).keys()
    with pytest.raises(PartitionError, match="more than one tree"):
        partition.merge(trainable, trainable)


def test_summary_counts_bytes_and_fraction(params):
    labels = partition.label(params, [("lora_", "lora"), ("head", "head")], default=FROZEN)
    s = partition.summary(params, labels)
    assert s.count == {FROZEN: 15, "lora": 8, "head": 6}
    assert s.bytes == {FROZEN: 60, "lora": 16, "head": 24}    # lora is bf16
    assert s.trainable == 14 and s.total == 29
    assert np.isclose(s.trainable_fraction, 14 / 29)
    text = str(s)
    assert "trainable params: 14 || all params: 29 || trainable%: 48.2759" in text


def test_unflatten_inverts_flatten(params):
    assert partition.flatten(partition.unflatten(partition.flatten(params))) == partition.flatten(params)
    assert partition.unflatten({"a/b": 1, "a/c/d": 2}) == {"a": {"b": 1, "c": {"d": 2}}}
