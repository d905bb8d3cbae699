"""Bad method options fail at once with a message naming the culprit."""

import jax
import pytest

from ptune import methods, models
from ptune.partition import PartitionError

GPT2 = models.model_config("gpt2-tiny")


@pytest.mark.parametrize("name,options,message", [
    ("lorra", {}, r"unknown method 'lorra'; choose one of \['adapter', 'bitfit'"),
    ("lora", {"rank": 0}, "rank=0 must be a positive integer"),
    ("lora", {"rank": -1}, "rank=-1 must be a positive integer"),
    ("lora", {"rank": 1.5}, "rank=1.5 must be a positive integer"),
    ("lora", {"rnak": 4}, r"has no option\(s\) \['rnak'\]; its options are \['rank'"),
    ("lora", {"dropout": 1.0}, r"dropout=1.0 must be in \[0, 1\)"),
    ("prompt", {"length": 0}, "length=0 must be a positive integer"),
    ("prompt", {"length": 128}, r"length=128 must be < 128 \(the model's context\)"),
    ("prefix", {"length": 500}, "length=500 must be < 128"),
    ("ptuning_v2", {"length": -3}, "length=-3 must be a positive integer"),
    ("prompt", {"init": "text"}, "init='text' and init_text go together"),
    ("prompt", {"init": "zeros"}, r"init='zeros'; choose one of \('uniform'"),
    ("adapter", {"placement": "middle"}, r"placement='middle'; choose one of \('houlsby', 'pfeiffer'\)"),
    ("manual", {"template": "no field"}, "must contain the '{text}' field"),
    ("head", {}, "the model has no task head; set model.num_labels > 0"),
    ("lora+prompt", {"rank": 4}, r"options \['rank'\] belong to no part; give them as method.<part>.<option>"),
])
def test_bad_options(name, options, message):
    with pytest.raises(ValueError, match=message):
        methods.get(name, GPT2, **options)


def test_targets_matching_no_layer():
    method = methods.get("lora", GPT2, targets=["q_proj"])
    with pytest.raises(ValueError, match=r"targets '\(\^\|/\)\(q_proj\)\$' match no layer of this gpt2 model; "
                                         r"linear layers are e.g. \['transformer/h_N/attn/c_attn'"):
        models.init(models.build(GPT2, method.sites), jax.random.key(0))


def test_conflicting_labels_from_composed_methods():
    method = methods.get("full+lora", GPT2)
    params = models.init(models.build(GPT2, method.sites), jax.random.key(0))
    with pytest.raises(PartitionError, match=r"label 'transformer/h_0/attn/c_attn/lora_a' differently: "
                                             r"'full' from full, 'lora' from lora"):
        method.labels(params)


def test_bitfit_on_a_model_without_biases():
    cfg = models.model_config("llama-tiny")
    method = methods.get("bitfit", cfg)
    params = models.init(models.build(cfg, method.sites), jax.random.key(0))
    with pytest.raises(PartitionError, match="matches no parameter"):
        method.labels(params)


def test_rules_that_train_nothing():
    method = methods.Method("nothing", rules=[("bias$", "frozen")])
    params = models.init(models.build(GPT2), jax.random.key(0))
    with pytest.raises(PartitionError, match="method 'nothing' leaves zero trainable parameters"):
        method.labels(params)
