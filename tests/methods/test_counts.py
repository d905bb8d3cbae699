"""Every method's trainable count equals its closed-form formula on real model shapes.

The formulas are written from the ModelConfig fields; the shapes are evaluated
abstractly (`models.abstract_params`, nothing allocated) for GPT-2 small, BERT-base and
SmolLM2-135M (grouped-query attention: keys/values have num_kv_heads * head_dim features).
"""

import jax
import numpy as np
import pytest

from ptune import methods, models, partition

REAL = ["gpt2", "bert-base", "smollm2-135m"]
NUM_LABELS = 2


@pytest.fixture
def count(abstract):
    """count(preset, name, **options) -> (config, {label: parameter count})."""
    def count(preset, name, **options):
        cfg = models.model_config(preset, num_labels=NUM_LABELS)
        method = methods.get(name, cfg, **options)
        cfg, params = abstract(preset, method.sites, NUM_LABELS)
        return cfg, partition.summary(params, method.labels(params)).count
    return count


def kv_dim(cfg):
    return cfg.num_kv_heads * cfg.head_dim


def backbone(cfg):
    """Every parameter but the task head."""
    d, L, ff, kv = cfg.hidden_size, cfg.num_layers, cfg.intermediate_size, kv_dim(cfg)
    dense = lambda i, o, bias=True: i * o + (o if bias else 0)
    if cfg.family == "gpt2":
        embed = cfg.vocab_size * d + cfg.max_positions * d
        layer = 2 * d + dense(d, 3 * d) + dense(d, d) + 2 * d + dense(d, ff) + dense(ff, d)
        final = 2 * d                                                  # ln_f
    elif cfg.family == "llama":
        embed = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
        b = cfg.qkv_bias
        layer = (d + dense(d, d, b) + 2 * dense(d, kv, b) + dense(d, d, False)
                 + d + 3 * dense(d, ff, False))
        final = d                                                      # norm
    else:
        embed = (cfg.vocab_size + cfg.max_positions + cfg.type_vocab_size) * d + 2 * d
        layer = 3 * dense(d, d) + dense(d, d) + 2 * d + dense(d, ff) + dense(ff, d) + 2 * d
        final = dense(d, d)                                            # pooler
    return embed + L * layer + final


def head(cfg):
    return cfg.num_labels * cfg.hidden_size + (cfg.num_labels if cfg.head_bias else 0)


def lora_shapes(cfg):
    """(d_in, d_out) of the default LoRA targets of one layer."""
    d, kv = cfg.hidden_size, kv_dim(cfg)
    return {"gpt2": [(d, 3 * d)],                      # fused c_attn
            "bert": [(d, d), (d, d)],                  # query, value
            "llama": [(d, d), (d, kv)]}[cfg.family]    # q_proj, v_proj


def lora_a(cfg, r):
    return cfg.num_layers * sum(r * i for i, _ in lora_shapes(cfg))


def lora_b(cfg, r):
    return cfg.num_layers * sum(r * o for _, o in lora_shapes(cfg))


def test_backbones_have_their_published_sizes(count):
    """The backbone formula itself, against the published sizes of the three models."""
    published = {"gpt2": 124_439_808, "bert-base": 109_482_240, "smollm2-135m": 134_515_008}
    for preset, n in published.items():
        cfg, c = count(preset, "full")
        assert backbone(cfg) == n
        assert c == {"full": n, partition.FROZEN: head(cfg)}


@pytest.mark.parametrize("preset", REAL)
def test_full_head_manual(count, preset):
    cfg, c = count(preset, "full")
    assert c == {"full": backbone(cfg), partition.FROZEN: head(cfg)}
    cfg, c = count(preset, "head")
    assert c == {"head": head(cfg), partition.FROZEN: backbone(cfg)}
    cfg, c = count(preset, "manual")                   # labels work and train nothing
    assert c == {partition.FROZEN: backbone(cfg) + head(cfg)}


def test_head_sizes_literal(count):
    assert count("gpt2", "head")[1]["head"] == 2 * 768                  # score: no bias
    assert count("bert-base", "head")[1]["head"] == 2 * 768 + 2         # classifier: kernel + bias
    assert count("smollm2-135m", "head")[1]["head"] == 2 * 576


@pytest.mark.parametrize("preset", ["gpt2", "bert-base"])
def test_bitfit(count, preset):
    cfg, c = count(preset, "bitfit")
    d, ff, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    if cfg.family == "gpt2":   # c_attn, attn.c_proj, c_fc, mlp.c_proj, ln_1, ln_2; ln_f
        biases = L * (3 * d + d + ff + d + d + d) + d
    else:                      # query, key, value, attn out, its LayerNorm, intermediate, output, its LayerNorm;
        biases = L * (3 * d + d + d + ff + d + d) + d + d   # embeddings LayerNorm, pooler
    assert c == {"bitfit": biases, partition.FROZEN: backbone(cfg) + head(cfg) - biases}


@pytest.mark.parametrize("preset", REAL)
def test_lora_default_targets(count, preset):
    cfg, c = count(preset, "lora", rank=8)
    assert c == {"lora": lora_a(cfg, 8) + lora_b(cfg, 8),
                 partition.FROZEN: backbone(cfg) + head(cfg)}


def test_lora_literals(count):
    # LoRA paper / PEFT: BERT-base, q and v, r = 8.
    assert count("bert-base", "lora", rank=8)[1]["lora"] == 294_912
    assert count("gpt2", "lora", rank=8)[1]["lora"] == 12 * 8 * (768 + 3 * 768)
    assert count("smollm2-135m", "lora", rank=8)[1]["lora"] == 30 * 8 * (576 + 576 + 576 + 192)


@pytest.mark.parametrize("preset", REAL)
def test_lora_rslora_with_lr_ratio_splits_a_and_b(count, preset):
    cfg, c = count(preset, "lora", rank=4, rslora=True, lr_ratio_b=16.0)
    assert c == {"lora": lora_a(cfg, 4), "lora_b": lora_b(cfg, 4),
                 partition.FROZEN: backbone(cfg) + head(cfg)}


@pytest.mark.parametrize("preset", REAL)
def test_ia3(count, preset):
    cfg, c = count(preset, "ia3")
    d, kv, ff = cfg.hidden_size, kv_dim(cfg), cfg.intermediate_size
    per_layer = {"gpt2": 3 * d + ff,           # c_attn output; mlp.c_proj input
                 "llama": kv + kv + ff,        # k_proj, v_proj outputs; down_proj input
                 "bert": d + d + d + ff}       # key, value outputs; attention.output.dense, output.dense inputs
    assert c["ia3"] == cfg.num_layers * per_layer[cfg.family]
    assert c[partition.FROZEN] == backbone(cfg) + head(cfg)


@pytest.mark.parametrize("preset", REAL)
@pytest.mark.parametrize("placement,per_layer", [("houlsby", 2), ("pfeiffer", 1)])
def test_adapter(count, preset, placement, per_layer):
    m = 16                                             # not the default (64): the option is honoured
    cfg, c = count(preset, "adapter", size=m, placement=placement)
    d = cfg.hidden_size
    assert c["adapter"] == cfg.num_layers * per_layer * (d * m + m + m * d + d)
    assert c[partition.FROZEN] == backbone(cfg) + head(cfg)


@pytest.mark.parametrize("preset", REAL)
def test_prompt(count, preset):
    cfg, c = count(preset, "prompt", length=20)
    assert c == {"prompt": 20 * cfg.hidden_size, partition.FROZEN: backbone(cfg) + head(cfg)}


@pytest.mark.parametrize("preset", REAL)
def test_ptuning_v2(count, preset):
    cfg, c = count(preset, "ptuning_v2", length=20)
    assert c == {"prefix": 2 * cfg.num_layers * 20 * kv_dim(cfg), partition.FROZEN: backbone(cfg) + head(cfg)}


@pytest.mark.parametrize("preset", REAL)
def test_prefix_reparameterised(count, preset):
    length, hidden = 10, 64                            # not the defaults (20, 512): the options are honoured
    cfg, c = count(preset, "prefix", length=length, hidden=hidden)
    d, out = cfg.hidden_size, cfg.num_layers * 2 * kv_dim(cfg)
    assert c == {"prefix": length * d + (d * hidden + hidden) + (hidden * out + out),
                 partition.FROZEN: backbone(cfg) + head(cfg)}


def test_gqa_kv_is_smaller_than_d_model():
    """SmolLM2's keys/values are a third of d_model; the formulas above rely on it."""
    cfg = models.model_config("smollm2-135m")
    assert kv_dim(cfg) == 192 and cfg.hidden_size == 576


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny", "bert-tiny"])
def test_folded_prefix_is_2_x_layers_x_length_x_kv(tiny, preset):
    cfg = models.model_config(preset)
    method = methods.get("prefix", cfg, length=4, hidden=16)
    cfg, model, params = tiny(preset, method.sites)
    c = partition.summary(params, method.labels(params)).count
    d, out = cfg.hidden_size, cfg.num_layers * 2 * kv_dim(cfg)
    assert c["prefix"] == 4 * d + (d * 16 + 16) + (16 * out + out)
    folded, sites = method.folded(params, model)
    assert sites.prefix == models.sites.Prefix(4, None)
    assert list(partition.flatten(folded["prefix"])) == ["kv"]
    c = partition.summary(folded, method.labels(folded)).count
    assert c["prefix"] == 2 * cfg.num_layers * 4 * kv_dim(cfg)
    if cfg.num_kv_heads == cfg.num_heads:   # multi-head attention: 2 x layers x L x d_model
        assert c["prefix"] == 2 * cfg.num_layers * 4 * cfg.hidden_size
    assert c[partition.FROZEN] == backbone(cfg) + head(cfg)
    # The base is untouched by folding.
    base = {k: v for k, v in folded.items() if k != "prefix"}
    assert jax.tree.all(jax.tree.map(np.array_equal, base, {k: params[k] for k in base}))


@pytest.mark.parametrize("preset", REAL)
def test_composed_is_the_sum_of_its_parts(count, preset):
    cfg, c = count(preset, "lora+prompt", lora={"rank": 8}, prompt={"length": 20})
    assert c == {"lora": lora_a(cfg, 8) + lora_b(cfg, 8), "prompt": 20 * cfg.hidden_size,
                 partition.FROZEN: backbone(cfg) + head(cfg)}
    _, lora = count(preset, "lora", rank=8)
    _, prompt = count(preset, "prompt", length=20)
    assert sum(v for k, v in c.items() if k != partition.FROZEN) == lora["lora"] + prompt["prompt"]
    cfg, c = count(preset, "ia3+head")
    _, ia3 = count(preset, "ia3")
    assert c == {"ia3": ia3["ia3"], "head": head(cfg), partition.FROZEN: backbone(cfg)}
