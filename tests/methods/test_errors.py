"""Bad method options fail with a ValueError that names the culprit."""

import re

import flax.linen
import jax
import pytest

from ptune import methods, models, partition

GPT2 = models.model_config("gpt2-tiny", num_labels=2)     # max_positions 128
LIMIT = GPT2.max_positions


@pytest.mark.parametrize("name,options,message", [
    ("lora", {"rank": 0}, "method lora: rank=0 must be a positive integer"),
    ("lora", {"rank": -1}, "method lora: rank=-1 must be a positive integer"),
    ("lora", {"rank": 1.5}, "method lora: rank=1.5 must be a positive integer"),
    ("lora", {"rank": True}, "method lora: rank=True must be a positive integer"),
    ("lora", {"alpha": 0}, "method lora: alpha=0 must be > 0"),
    ("lora", {"dropout": 1.0}, r"method lora: dropout=1.0 must be in \[0, 1\)"),
    ("lora", {"lr_ratio_b": 0.5}, "method lora: lr_ratio_b=0.5 must be >= 1"),
    ("lora", {"rnak": 4}, r"method 'lora' has no option\(s\) \['rnak'\]; its options are \['rank', 'alpha'"),
    ("prompt", {"length": 0}, "method prompt: length=0 must be a positive integer"),
    ("prompt", {"length": LIMIT}, rf"method prompt: length={LIMIT} must be < {LIMIT} \(the model's context\)"),
    ("prompt", {"length": 4 * LIMIT}, rf"method prompt: length={4 * LIMIT} must be < {LIMIT}"),
    ("prefix", {"length": 0}, "method prefix: length=0 must be a positive integer"),
    ("prefix", {"length": LIMIT}, rf"method prefix: length={LIMIT} must be < {LIMIT} \(the model's context\)"),
    ("prefix", {"hidden": 0}, "method prefix: hidden=0 must be a positive integer"),
    ("ptuning_v2", {"length": 0}, "method ptuning_v2: length=0 must be a positive integer"),
    ("ptuning_v2", {"length": LIMIT}, rf"method ptuning_v2: length={LIMIT} must be < {LIMIT}"),
    ("prompt", {"init": "text"}, "method prompt: init='text' and init_text go together"),
    ("prompt", {"init_text": "hello"}, "method prompt: init='text' and init_text go together"),
    ("prompt", {"init": "zeros"}, r"method prompt: init='zeros'; choose one of \('uniform', 'vocab', 'text', 'labels'\)"),
    ("adapter", {"placement": "middle"}, r"method adapter: placement='middle'; choose one of \('houlsby', 'pfeiffer'\)"),
    ("adapter", {"size": 0}, "method adapter: size=0 must be a positive integer"),
    ("adapter", {"activation": "swiglu"}, "method adapter: activation='swiglu'; choose one of"),
    ("manual", {"template": "no field"}, r"method manual: template 'no field' must contain the '\{text\}' field"),
    ("lora+prompt", {"rank": 4}, (r"method 'lora\+prompt': options \['rank'\] belong to no part; "
                                  r"give them as method.<part>.<option>, parts: \['lora', 'prompt'\]")),
    ("lora+prompt", {"prefix": {"length": 4}}, r"options \['prefix'\] belong to no part"),
    ("lora+prompt", {"lora": {"rnak": 4}}, r"method 'lora' has no option\(s\) \['rnak'\]"),
    ("lora+prompt", {"prompt": {"length": 0}}, "method prompt: length=0 must be a positive integer"),
    ("lora+lorra", {}, "unknown method 'lorra'"),
])
def test_bad_options(name, options, message):
    with pytest.raises(ValueError, match=message):
        methods.get(name, GPT2, **options)


def test_good_boundaries_are_accepted():
    """The limits above are exact: the largest allowed values pass."""
    for name in ("prompt", "prefix", "ptuning_v2"):
        methods.get(name, GPT2, length=LIMIT - 1)
    methods.get("lora", GPT2, rank=1, dropout=0.0, lr_ratio_b=1.0)


def test_unknown_method_lists_the_choices():
    with pytest.raises(ValueError, match="unknown method 'lorra'") as error:
        methods.get("lorra", GPT2)
    listed = re.search(r"choose one of (\[.*?\])", str(error.value)).group(1)
    assert listed == str(sorted(methods.REGISTRY))
    assert len(methods.REGISTRY) >= 10 and "ptuning_v2" in listed


def test_lora_targets_matching_no_layer():
    method = methods.get("lora", GPT2, targets=["q_proj"])
    with pytest.raises(ValueError, match=r"method lora: targets '\(\^\|/\)\(q_proj\)\$' match no layer of this "
                                         r"gpt2 model; linear layers are e.g. \[.*'transformer/h_N/attn/c_attn'"):
        models.init(models.build(GPT2, method.sites), jax.random.key(0))


def test_ia3_targets_matching_no_layer(abstract):
    """The same check on abstract shapes (no init needed), for IA3."""
    method = methods.get("ia3", GPT2, targets=["nowhere"])
    model = models.build(GPT2, method.sites)
    _, params = abstract("gpt2-tiny", method.sites, 2)
    with pytest.raises(ValueError, match=r"method ia3: targets '\(\^\|/\)\(nowhere\)\$' match no layer"):
        models.check_sites(model, params)


@pytest.mark.parametrize("name,path,first,second", [
    ("full+lora", "transformer/h_0/attn/c_attn/lora_a", "'full' from full", "'lora' from lora"),
    ("bitfit+full", "transformer/h_0/attn/c_attn/bias", "'bitfit' from bitfit", "'full' from full"),
])
def test_conflicting_labels_from_composed_methods(abstract, name, path, first, second):
    method = methods.get(name, GPT2)
    _, params = abstract("gpt2-tiny", method.sites, 2)
    with pytest.raises(partition.PartitionError,
                       match=f"composed methods label {re.escape(repr(path))} differently: {first}, {second}"):
        method.labels(params)


def test_composed_sites_that_disagree():
    with pytest.raises(ValueError, match="composed methods ask for different lora sites"):
        methods.compose(methods.get("lora", GPT2, rank=4), methods.get("lora", GPT2, rank=8))
    with pytest.raises(ValueError, match="composed methods give different templates"):
        methods.compose(methods.get("manual", GPT2, template="A {text}"),
                        methods.get("manual", GPT2, template="B {text}"))


def test_bitfit_on_a_model_without_biases(abstract):
    cfg = models.model_config("llama-tiny")
    assert not cfg.qkv_bias
    method = methods.get("bitfit", cfg)
    _, params = abstract("llama-tiny", method.sites, 0)
    with pytest.raises(ValueError, match=r"rule \('.*bias\$' -> 'bitfit'\) matches no parameter"):
        method.labels(params)


def test_bitfit_on_a_llama_with_qkv_bias_works():
    """The error above is about the model, not the family: Qwen2-style qkv biases make it valid."""
    cfg = models.model_config("llama-tiny", qkv_bias=True)
    method = methods.get("bitfit", cfg)
    params = flax.linen.unbox(models.abstract_params(models.build(cfg, method.sites)))
    kv = cfg.num_kv_heads * cfg.head_dim
    assert partition.summary(params, method.labels(params)).count["bitfit"] == cfg.num_layers * (cfg.hidden_size + 2 * kv)


def test_head_without_a_task_head():
    with pytest.raises(ValueError, match="method head: the model has no task head; set model.num_labels > 0"):
        methods.get("head", models.model_config("gpt2-tiny", num_labels=0))
    methods.get("head", models.model_config("gpt2-tiny", num_labels=1))


def test_rules_that_train_nothing(abstract):
    method = methods.Method("nothing", rules=[("bias$", partition.FROZEN)])
    _, params = abstract("gpt2-tiny", method.sites, 2)
    with pytest.raises(partition.PartitionError, match="method 'nothing' leaves zero trainable parameters"):
        method.labels(params)


def test_manual_labels_everything_frozen(abstract):
    method = methods.get("manual", GPT2)
    _, params = abstract("gpt2-tiny", method.sites, 2)
    assert set(jax.tree.leaves(method.labels(params))) == {partition.FROZEN}
