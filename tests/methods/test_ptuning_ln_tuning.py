"""P-tuning (PEFT's PromptEncoder, MLP and LSTM) and LN tuning: their counts in closed form on real
shapes, the fold of P-tuning's encoder, and bad options. Parity with PEFT: tests/test_hf_peft_ptuning_ln.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_counts import backbone, head

from ptune import methods, models, partition
from ptune.inference import bank
from ptune.models.sites import PTuning

REAL = ["gpt2", "bert-base", "smollm2-135m"]
GPT2 = models.model_config("gpt2-tiny")


def count(abstract, preset, name, **options):
    """(config, {label: parameter count}) of a method on a real model's shapes (nothing allocated)."""
    cfg = models.model_config(preset, num_labels=2)
    method = methods.get(name, cfg, **options)
    cfg, params = abstract(preset, method.sites, 2)
    return cfg, partition.summary(params, method.labels(params)).count


def lstm_encoder(d, h, layers):
    """PyTorch's bidirectional nn.LSTM (two biases per gate), then Linear(2h, 2h) - ReLU - Linear(2h, d)."""
    lstm = sum(2 * (4 * h * (n_in + h) + 8 * h) for n_in in [d] + [2 * h] * (layers - 1))
    return lstm + (2 * h * 2 * h + 2 * h) + (2 * h * d + d)


@pytest.mark.parametrize("preset", REAL)
def test_ptuning_counts(abstract, preset):
    length, h = 10, 64                                 # not the defaults (20, 128): the options are honoured
    cfg, c = count(abstract, preset, "ptuning", length=length, hidden=h)
    d = cfg.hidden_size
    assert c == {"ptuning": length * d + (d * h + h) + (h * h + h) + (h * d + d),
                 partition.FROZEN: backbone(cfg) + head(cfg)}
    for layers in (1, 3):
        _, c = count(abstract, preset, "ptuning", length=length, encoder="lstm", hidden=h, layers=layers)
        assert c["ptuning"] == length * d + lstm_encoder(d, h, layers)


def test_ptuning_count_literals(abstract):
    """GPT-2 small at the defaults: 20 x 768 embeddings, then the MLP 768-128-128-768; PEFT's own count of the
    LSTM encoder on gpt2-tiny (d = 64, 3 tokens, width 16, 2 layers) is 20,256."""
    assert count(abstract, "gpt2", "ptuning")[1]["ptuning"] == 15_360 + 98_432 + 16_512 + 99_072
    assert count(abstract, "gpt2-tiny", "ptuning", length=3, encoder="lstm", hidden=16)[1]["ptuning"] == 20_256


@pytest.mark.parametrize("preset", REAL)
def test_ln_tuning_counts(abstract, preset):
    cfg, c = count(abstract, preset, "ln_tuning")
    per_norm = cfg.hidden_size * (1 if cfg.family == "llama" else 2)   # RMSNorm has no bias
    # PEFT's defaults: two norms a layer and the final one; for BERT every LayerNorm, the embeddings' too.
    tuned = (2 * cfg.num_layers + 1) * per_norm
    assert c == {"ln_tuning": tuned, partition.FROZEN: backbone(cfg) + head(cfg) - tuned}
    final = {"gpt2": "ln_f", "llama": "norm", "bert": "embeddings.LayerNorm"}[cfg.family]
    assert count(abstract, preset, "ln_tuning", targets=[final])[1]["ln_tuning"] == per_norm


def test_ln_tuning_count_literals(abstract):
    assert count(abstract, "gpt2", "ln_tuning")[1]["ln_tuning"] == 25 * 2 * 768 == 38_400
    # A regex selects among the norm layers: two RMSNorms of 576.
    assert count(abstract, "smollm2-135m", "ln_tuning", targets=r"layers_[01]/input_layernorm$")[1][
        "ln_tuning"] == 1_152


@pytest.mark.parametrize("preset,encoder", [("gpt2-tiny", "mlp"), ("llama-tiny", "lstm")])
def test_fold_keeps_outputs(tiny, preset, encoder):
    """The encoder evaluated into the prompt (one (L, d) leaf) gives the same outputs; a bank takes only that."""
    method = methods.get("ptuning", models.model_config(preset), length=3, encoder=encoder, hidden=8)
    cfg, model, params = tiny(preset, method.sites)
    folded, sites = method.folded(params, model)
    assert sites.ptuning == PTuning(3, encoder, 8, 2, folded=True)
    assert {p: x.shape for p, x in partition.flatten(folded["ptuning"]).items()} == {"embedding": (3, cfg.hidden_size)}
    ids = jnp.array([[11, 12, 13, 14], [15, 16, 17, 18]])
    classify = lambda model, params: jax.jit(model.apply, static_argnames="output")({"params": params}, ids,
                                                                                       output="class")
    before = classify(model, params)
    np.testing.assert_allclose(classify(models.build(cfg, sites), folded), before, atol=1e-6, rtol=0)
    _, plain, base = tiny(preset, models.Sites())
    assert np.abs(classify(plain, base) - before).max() > 1e-3   # the prompt matters
    assert bank.envelope({"task": sites}) == sites
    with pytest.raises(ValueError, match="task 'raw': its P-tuning prompt is in training form"):
        bank.envelope({"task": sites, "raw": method.sites})


@pytest.mark.parametrize("name,options,message", [
    ("ptuning", dict(encoder="gru"), r"method ptuning: encoder='gru'; choose one of \('mlp', 'lstm'\)"),
    ("ptuning", dict(layers=3), "layers=3 sets the LSTM's layers.*drop layers or set encoder='lstm'"),
    ("ptuning", dict(hidden=0), "method ptuning: hidden=0 must be a positive integer"),
    ("ptuning", dict(length=GPT2.max_positions), r"length=\d+ must be < \d+ \(the model's context\)"),
    ("ln_tuning", dict(targets=["c_attn"]), r"targets=\['c_attn'\] match no norm layer of this gpt2 model; its "
                                            r"norm layers are \['ln_1', 'ln_2', 'ln_f'\]"),
    ("ln_tuning", dict(targets=3), "method ln_tuning: targets=3 must be a regex string or a list of module names"),
])
def test_bad_options(name, options, message):
    with pytest.raises(ValueError, match=message):
        methods.get(name, GPT2, **options)
